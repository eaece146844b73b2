"""PPO from rsl_rl (the PPO behind legged_gym and Isaac Lab) on the tasks of envs.py, as the
baseline that PQL is measured against.

Two parts:
  * `RslRlVecEnv`, a small adapter from our batched env interface to rsl_rl's `VecEnv`
    (rsl-rl-lib 5.x: observations are a TensorDict of observation groups; ours is one group,
    "policy", used by both the actor and the critic);
  * a CLI that trains rsl_rl's PPO through its own `OnPolicyRunner` and writes the same
    TensorBoard scalars as pql.py (`charts/episodic_return` against env steps, `charts/SPS` =
    env steps / training seconds, ...) under `runs/{task}__{exp_name}__{seed}__{time}/`, so the
    readers of benchmarks/solve_times.py work on both.

    pip install -r benchmarks/requirements.txt
    python benchmarks/ppo.py --task Pendulum --max-time 120
    python benchmarks/ppo.py --task CartpoleSwingup --num-envs 4096 --device cuda

Settings: the usual massively parallel ones of legged_gym / Isaac Lab (see `train_cfg`): 24 steps per
env per iteration, 5 epochs of 4 mini-batches, clip 0.2, Adam lr 1e-3 with the adaptive (KL)
schedule, desired KL 0.01, entropy coefficient 0.005, gamma 0.99, lambda 0.95, value loss
coefficient 1 with value clipping, max grad norm 1, Gaussian policy with learned state-independent
std starting at 1.0, ELU MLPs of the same sizes as PQL's networks for the task (see
solve_times.TASKS, else pql.TASK_DEFAULTS), and observation normalization (PQL normalizes observations too). Rewards are
multiplied by the same per-task scale as PQL's (`pql.TASK_DEFAULTS`): rsl_rl does not
normalize rewards, and its value clipping (0.2 per update) is made for values of order 1, which
raw Pendulum returns (about -1000) are not.

Number of envs: PQL's CPU quick start uses 64 envs because each of its env steps is followed by 8
critic updates, so more envs mean more work per step. PPO does about 20 forward-backward passes per
sample in all, far less than PQL's, and needs a large on-policy batch per update; the usual setting is
thousands of envs (legged_gym: 4096). On a 2-core CPU 4096 envs give about the same env steps/s as
1024 but a quarter as many updates per sample, and in a 30 s Pendulum trial 1024 envs (24,576
samples per update) learned much faster in wall-clock time, so 1024 is the default here; on a GPU
use 4096 (`--num-envs 4096`).

Time limits: all built-in tasks end by truncation. The adapter reports dones = terminated | truncated
and extras["time_outs"] = truncated and not terminated, so rsl_rl bootstraps through time limits
(it adds gamma * V(s_t) to the last reward, its usual approximation, since it is not given the final
observation). The Isaac Gym adapter's invalid reset steps (`info["valid"]`) are passed on as ordinary
steps with zero reward; the built-in and Gymnasium tasks never produce them.
"""
import sys

# Isaac Gym must be imported before torch (it raises otherwise), as in pql.py.
if any("isaacgym:" in arg for arg in sys.argv):
    import isaacgym  # noqa: F401

import argparse
import os
import random
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import envs  # noqa: E402
from pql import TASK_DEFAULTS  # noqa: E402
from solve_times import TASKS  # noqa: E402

from rsl_rl.env import VecEnv  # noqa: E402
from rsl_rl.runners import OnPolicyRunner  # noqa: E402
from tensordict import TensorDict  # noqa: E402

# PPO's number of envs per task on a CPU (see the module docstring).
DEFAULT_NUM_ENVS = 1024


def flag_values(flags, name):
    """The values after `name` in a command-line list, up to the next flag."""
    start = flags.index(name) + 1
    end = start
    while end < len(flags) and not flags[end].startswith("--"):
        end += 1
    return flags[start:end]


def pql_hidden_dims(task):
    """The hidden layer sizes PQL uses for this task: in the benchmarks' quick start (solve_times.TASKS),
    else its settings for the task (pql.TASK_DEFAULTS), else PQL's default."""
    if task in TASKS and "--hidden-dims" in TASKS[task]["flags"]:
        return [int(v) for v in flag_values(TASKS[task]["flags"], "--hidden-dims")]
    return list(TASK_DEFAULTS.get(task, {}).get("hidden_dims", (512, 256, 128)))


class RslRlVecEnv(VecEnv):
    """An envs.py environment seen as an rsl_rl VecEnv.

    step() returns (observations, rewards, dones, extras) with observations a TensorDict holding
    one group "policy", rewards multiplied by `reward_scale`, dones = terminated | truncated as a
    long tensor, and extras["time_outs"] marking truncations so PPO bootstraps through them.
    The undiscounted episode returns (unscaled) and lengths of finished episodes are summed in
    `return_sum`, `length_sum`, `episodes` for the trainer to log.
    """

    def __init__(self, env, reward_scale=1.0):
        self.env = env
        self.num_envs = env.num_envs
        self.num_actions = env.act_dim
        self.max_episode_length = env.max_episode_length
        self.device = env.device
        self.cfg = {"task": env.task}
        self.reward_scale = reward_scale
        # Read by rsl_rl only with learn(init_at_random_ep_len=True), which our tasks do not support
        # (their episodes all end on the same step); kept up to date for completeness.
        self.episode_length_buf = torch.zeros(env.num_envs, dtype=torch.long, device=env.device)
        self.return_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        self.length_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        self.episodes = torch.zeros((), dtype=torch.float64, device=env.device)
        self.global_step = 0
        self.obs = env.reset()

    def _observations(self):
        return TensorDict({"policy": self.obs}, batch_size=[self.num_envs], device=self.device)

    def get_observations(self):
        return self._observations()

    def step(self, actions):
        # rsl_rl samples from an unbounded Gaussian; the env clips to its [-1, 1] (as Isaac Lab's
        # wrapper clips), and PPO keeps the unclipped sample for its log-probabilities.
        self.obs, reward, terminated, truncated, info = self.env.step(actions)
        ended = terminated | truncated
        self.global_step += self.num_envs
        self.episode_length_buf = torch.where(ended, torch.zeros_like(self.episode_length_buf), self.episode_length_buf + 1)
        ended_f = ended.double()
        self.return_sum += (info["episode_return"] * ended_f).sum()
        self.length_sum += (info["episode_length"] * ended_f).sum()
        self.episodes += ended_f.sum()
        extras = {"time_outs": truncated & ~terminated}
        return self._observations(), reward * self.reward_scale, ended.long(), extras


def evaluate_deterministic(policy, task, episodes, device, seed):
    """The trained policy's mean action, no sampling (as pql.py --eval-checkpoint runs PQL's actor):
    one episode on each of `episodes` fresh envs; returns (returns, lengths) as CPU tensors."""
    env = envs.make_env(task, episodes, device=device, seed=seed)
    returns = torch.zeros(episodes, device=env.device)
    lengths = torch.zeros(episodes, device=env.device)
    finished = torch.zeros(episodes, dtype=torch.bool, device=env.device)
    obs = env.reset()
    with torch.no_grad():
        for _ in range(env.max_episode_length + 2):  # +2: an Isaac Gym lazy reset step, and slack
            actions = policy(TensorDict({"policy": obs}, batch_size=[episodes], device=env.device))
            obs, _, terminated, truncated, info = env.step(actions)
            just_finished = (terminated | truncated) & ~finished
            returns = torch.where(just_finished, info["episode_return"], returns)
            lengths = torch.where(just_finished, info["episode_length"], lengths)
            finished |= just_finished
            if bool(finished.all()):
                break
    if hasattr(env, "close"):
        env.close()
    return returns[finished].cpu(), lengths[finished].cpu()


def train_cfg(hidden_dims, args):
    """rsl_rl 5.x runner configuration: the massively parallel PPO settings of legged_gym / Isaac Lab."""
    model = {"class_name": "MLPModel", "hidden_dims": list(hidden_dims), "activation": "elu", "obs_normalization": True}
    return {
        "num_steps_per_env": args.num_steps_per_env,
        "save_interval": 10**9,  # the runner saves nothing here (no log_dir); we write our own scalars
        "check_for_nan": True,
        "obs_groups": {"actor": ["policy"], "critic": ["policy"]},
        "actor": dict(model, distribution_cfg={"class_name": "GaussianDistribution", "init_std": args.init_noise_std, "std_type": "scalar"}),
        "critic": dict(model),
        "algorithm": {
            "class_name": "PPO",
            "num_learning_epochs": 5,
            "num_mini_batches": 4,
            "clip_param": 0.2,
            "gamma": 0.99,
            "lam": 0.95,
            "value_loss_coef": 1.0,
            "use_clipped_value_loss": True,
            "entropy_coef": args.entropy_coef,
            "learning_rate": args.learning_rate,
            "schedule": "adaptive",
            "desired_kl": 0.01,
            "max_grad_norm": 1.0,
        },
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Pendulum", help="a task of envs.py")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--num-envs", type=int, default=DEFAULT_NUM_ENVS)
    parser.add_argument("--total-timesteps", type=int, default=10**9, help="budget of env steps, summed over envs")
    parser.add_argument("--max-time", type=float, default=3600.0, help="budget of training seconds")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=None,
                        help="actor and critic hidden sizes; default: PQL's for the task (solve_times.TASKS, else pql.TASK_DEFAULTS)")
    parser.add_argument("--reward-scale", type=float, default=None, help="default: PQL's per-task scale")
    parser.add_argument("--num-steps-per-env", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--entropy-coef", type=float, default=0.005)
    parser.add_argument("--init-noise-std", type=float, default=1.0)
    parser.add_argument("--eval-episodes", type=int, default=10,
                        help="after training, episodes of the policy's mean action (no sampling), one per fresh env; 0: none")
    parser.add_argument("--exp-name", default="ppo")
    args = parser.parse_args(argv)
    if args.num_envs < 1 or args.total_timesteps < 1 or args.max_time <= 0 or args.num_steps_per_env < 1:
        parser.error("--num-envs, --total-timesteps, --num-steps-per-env must be >= 1 and --max-time > 0")
    if args.eval_episodes < 0:
        parser.error("--eval-episodes must be >= 0")
    if args.num_envs * args.num_steps_per_env < 4:
        parser.error("--num-envs x --num-steps-per-env must be >= 4 (4 mini-batches)")
    return args


def main(argv=None):
    args = parse_args(argv)
    from torch.utils.tensorboard import SummaryWriter

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    hidden_dims = args.hidden_dims or pql_hidden_dims(args.task)
    reward_scale = args.reward_scale if args.reward_scale is not None else TASK_DEFAULTS.get(args.task, {}).get("reward_scale", 1.0)
    env = envs.make_env(args.task, args.num_envs, device=args.device, seed=args.seed)
    env.check_finite_actions = False  # rsl_rl checks the observations for NaN itself
    vec_env = RslRlVecEnv(env, reward_scale)
    cfg = train_cfg(hidden_dims, args)
    runner = OnPolicyRunner(vec_env, cfg, log_dir=None, device=args.device)  # log_dir None: rsl_rl writes nothing

    run_name = f"{args.task.replace(':', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    writer = SummaryWriter(os.path.join("runs", run_name))
    settings = dict(vars(args), hidden_dims=hidden_dims, reward_scale=reward_scale, **cfg["algorithm"])
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in settings.items()))

    steps_per_iteration = args.num_envs * args.num_steps_per_env
    start_time = time.time()
    mean_return, iteration = float("nan"), 0
    while vec_env.global_step < args.total_timesteps and time.time() - start_time < args.max_time:
        # One PPO iteration exactly as rsl_rl's runner runs it: 24 steps of all envs, then 5 epochs x 4 mini-batches.
        runner.learn(num_learning_iterations=1)
        iteration += 1
        elapsed = time.time() - start_time
        step = vec_env.global_step
        episodes = vec_env.episodes.item()
        if episodes > 0:
            mean_return = vec_env.return_sum.item() / episodes
            writer.add_scalar("charts/episodic_return", mean_return, step)
            writer.add_scalar("charts/episodic_length", vec_env.length_sum.item() / episodes, step)
            for total in (vec_env.return_sum, vec_env.length_sum, vec_env.episodes):
                total.zero_()
        writer.add_scalar("charts/SPS", step / elapsed, step)
        writer.add_scalar("charts/learning_rate", runner.alg.learning_rate, step)
        writer.add_scalar("charts/action_std", runner.alg.get_policy().distribution.std_param.mean().item(), step)
        if iteration % 10 == 0:
            print(f"iteration {iteration}: {step} env steps, {step / elapsed:.0f} SPS, return {mean_return:.1f}", flush=True)
    if args.eval_episodes > 0 and args.task.startswith("isaacgym:"):
        print("no evaluation of the final policy: Isaac Gym allows one simulator per process")
    elif args.eval_episodes > 0:
        # The training return above comes from sampled actions (rsl_rl's learned std ends at 0.67 to 0.85 on the
        # MuJoCo tasks); PQL's table figure is its deterministic policy's: this is PPO's, at the end.
        returns, lengths = evaluate_deterministic(runner.get_inference_policy(args.device), args.task, args.eval_episodes,
                                                  args.device, args.seed + 10_000)
        writer.add_scalar("eval/episodic_return", returns.mean().item(), vec_env.global_step)
        writer.add_scalar("eval/episodic_length", lengths.mean().item(), vec_env.global_step)
        print(f"deterministic policy: mean return {returns.mean():.2f} +- {returns.std(unbiased=False):.2f} over"
              f" {len(returns)} episodes (mean length {lengths.mean():.1f})")
    writer.close()
    print(f"{run_name}: {vec_env.global_step} env steps ({steps_per_iteration} per iteration) in "
          f"{time.time() - start_time:.1f} s; latest mean return {mean_return:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
