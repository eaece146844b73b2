"""Parallel Q-Learning (PQL) with the three roles running at the same time.

Li, Chen, Agrawal et al., "Parallel Q-Learning: Scaling Off-policy Reinforcement Learning
under Massively Parallel Simulation", ICML 2023 (arXiv 2307.12983).

The same algorithm, flags and outputs as pql.py, which runs the roles in turn in one thread;
here they run in parallel, as in the paper:
  * the actor (this file's main thread) steps the environments and writes the replay buffer;
  * the V-learner (a thread) trains the twin Q critic;
  * the P-learner (a thread) trains the policy.
On a GPU each learner issues its work on its own CUDA stream and the actor on the default one
(its simulator's), so the GPU runs their kernels concurrently; --actor-device, --v-learner-device
and --p-learner-device spread the roles over several GPUs. The ratios (`v_updates_per_env_step`,
`v_updates_per_p_update`) hold by counting: whichever role runs ahead waits. Networks pass between
roles through locked snapshots.

Everything but the parallelism is line for line the same as in pql.py (no import from it: each
script stands alone), so `diff pql.py pql_threaded.py` shows only what parallelism takes;
tests/test_shared_code.py checks it.

    python pql_threaded.py --num-envs 4096
    python pql_threaded.py --eval-checkpoint runs/<run>/model.pt
"""
import sys

# Isaac Gym must be imported before torch (it raises otherwise), so look at the command line first.
if any("isaacgym:" in arg for arg in sys.argv):
    import isaacgym  # noqa: F401

import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import os
import random
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import envs


@dataclass
class Args:
    # --- experiment ---
    exp_name: str = "pql"
    """name of this experiment, part of the run name `{task}__{exp_name}__{seed}__{time}`"""
    task: str = "Pendulum"
    """a task of envs.py: a built-in one (`python envs.py` lists them), `gym:<id>`, `isaacgym:<Task>` or `mjlab:<TaskId>`"""
    num_envs: int = 4096
    """number of environments stepped together by the actor"""
    seed: int = 1
    """seed of the environments, the networks and the sampling"""
    device: str = "auto"
    """`auto` (CUDA if present), `cpu`, `cuda` or `cuda:N`"""
    total_timesteps: int = 20_000_000
    """budget of environment steps, summed over all environments"""
    max_time: float = 3600.0
    """budget of wall-clock seconds for training"""

    # --- algorithm (the public PQL code's defaults, for the settings it has) ---
    batch_size: int = 8192
    """transitions per V-learner and P-learner update"""
    buffer_size: int = 5_000_000
    """replay buffer capacity in transitions, summed over all environments, kept on the device"""
    nstep: int = 3
    """length of the n-step returns"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.05
    """target critic update rate, applied after every V-update"""
    critic_lr: float = 5e-4
    """learning rate of the critic (AdamW)"""
    actor_lr: float = 5e-4
    """learning rate of the policy (AdamW)"""
    max_grad_norm: float = 0.5
    """gradient norm clip of both networks"""
    hidden_dims: Tuple[int, ...] = (512, 256, 128)
    """hidden layer sizes of both networks, e.g. `--hidden-dims 64 64`"""
    warmup_iterations: int = 32
    """iterations (env steps of all envs) of uniform random actions before learning starts"""
    v_updates_per_env_step: int = 8
    """V-learner updates per env step of all environments (the paper's beta_a:v = 1:8)"""
    v_updates_per_p_update: int = 2
    """V-learner updates per P-learner update (the paper's beta_p:v = 1:2)"""
    std_min: float = 0.05
    """smallest exploration noise std (mixed exploration: env i uses its own std, spread evenly)"""
    std_max: float = 0.8
    """largest exploration noise std"""
    target_policy_noise: float = 0.8
    """std of the noise added to target actions (target policy smoothing)"""
    target_noise_clip: float = 0.2
    """the target action noise is clipped to +- this"""
    pre_tanh_bound: float = 3.0
    """the policy's outputs before its tanh are penalised quadratically beyond +- this, so the tanh cannot saturate (where the critic's gradient no longer moves the policy; docs/pendulum_seeds.md); inf: no penalty, as in the public code"""
    obs_clip: float = 5.0
    """normalized observations are clamped to +- this"""
    reward_scale: Optional[float] = None
    """rewards are multiplied by this before learning; default: the task's (TASK_DEFAULTS), else 1"""
    timeouts_as_terminal: bool = False
    """treat time-limit ends as terminal (the public code's behaviour) instead of bootstrapping through them"""
    distributional: bool = False
    """PQL-D: twin categorical (C51) critics over a fixed support instead of scalar ones"""
    num_atoms: int = 51
    """PQL-D: number of atoms of the support"""
    v_min: float = -10.0
    """PQL-D: smallest value of the support (scale rewards with --reward-scale so returns fit)"""
    v_max: float = 10.0
    """PQL-D: largest value of the support"""

    # --- speed: the same updates, fewer launches ---
    cuda_graphs: bool = True
    """record one V-update and one P-update (sampling included) as CUDA graphs and replay them: one graph launch per update (after its eager random draws) instead of hundreds of kernels; on where it applies (the learners on one CUDA device), elsewhere the updates run eagerly; --no-cuda-graphs: eagerly on CUDA too"""
    compile: bool = False
    """torch.compile the V- and P-update (sampling included); the first iterations wait for the compiler, about a minute"""
    tf32: bool = True
    """float32 matrix products on the GPU's TF32 tensor cores (10-bit mantissas, float32 sums; torch.backends.cuda.matmul.allow_tf32), as FastTD3 trains: the updates 1.8x faster at the default sizes on an H200; no effect on a CPU; --no-tf32: full float32"""
    bf16: bool = False
    """the learners' forward passes in bfloat16 (torch.autocast; 8-bit mantissas): hidden layers multiplied on a GPU's bfloat16 tensor cores and their activations at half the memory traffic, while weights, gradients, the optimizer, Q values and losses stay float32; not faster on a CPU"""

    # --- logging, checkpoints, evaluation ---
    log_interval: int = 10
    """iterations between logs; the only place where values are copied from the device"""
    save_interval: float = 300.0
    """seconds between checkpoints (one is also written at the end and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """evaluate this checkpoint (a model.pt) with the deterministic policy instead of training"""
    eval_episodes: int = 10
    """number of episodes for --eval-checkpoint"""
    eval_envs: Optional[int] = None
    """envs of their own that run the deterministic policy (no noise) during training, logged as eval/episodic_return; default 4, 0 for simulators (isaacgym: one per process; mjlab: a second simulator, whose step costs much of the training envs' however few its envs); 0 turns it off"""

    # --- parallelism (pql_threaded.py only) ---
    actor_device: Optional[str] = None
    """device of the actor role and the environments (default: --device)"""
    v_learner_device: Optional[str] = None
    """device of the V-learner, the critic and the replay buffer (default: --device)"""
    p_learner_device: Optional[str] = None
    """device of the P-learner and the policy it trains (default: --device)"""
    sync_interval: int = 4
    """updates between a learner's publishing of its networks to the other roles (iterations for the actor's obs statistics)"""


# Settings per task: they replace Args' defaults above whenever --task names the task (parse_args);
# a flag given on the command line still wins. Reward scales: with gamma = 0.99 returns are ~100x the
# per-step reward; the scales keep them within PQL-D's default support [-10, 10] and the scalar
# critic's values in a sane range (the Isaac Gym ones are the public code's). Gymnasium's MuJoCo
# tasks simulate on the CPU, one env after another, so there the learners' updates set the pace:
# 16 envs (8 V-updates of batch 256 per 16 env steps, half as many updates per env step as TD3),
# TD3's networks (256-256) and buffer, 10,000 random env steps first; chosen by measurement on a
# 2-core CPU (docs/environments.md#settings-for-the-mujoco-tasks).
TASK_DEFAULTS = {
    "Pendulum": dict(reward_scale=0.01),  # rewards in [-16.3, 0] per step
    "CartpoleSwingup": dict(reward_scale=0.1),  # rewards in [0, 1]
    "Reacher": dict(reward_scale=0.1),  # rewards ~ -(distance + control) >= -0.6
    "gym:HalfCheetah-v5": dict(num_envs=16, batch_size=256, hidden_dims=(256, 256), buffer_size=1_000_000,
                               warmup_iterations=625, reward_scale=0.01),  # rewards ~ -1 to 12 per step
    "gym:Hopper-v5": dict(num_envs=16, batch_size=256, hidden_dims=(256, 256), buffer_size=1_000_000,
                          warmup_iterations=625, reward_scale=0.01),  # rewards ~ 0 to 4 per step, until it falls
    "isaacgym:Ant": dict(reward_scale=0.01),
    "isaacgym:Humanoid": dict(reward_scale=0.01),
    "isaacgym:AllegroHand": dict(reward_scale=0.01),
    "isaacgym:ShadowHand": dict(reward_scale=0.01),
    "isaacgym:FrankaCubeStack": dict(reward_scale=0.1),
    "isaacgym:BallBalance": dict(reward_scale=0.1),
    "isaacgym:Anymal": dict(reward_scale=1.0),
    # mjlab's rewards come multiplied by the control step (envs.MjlabEnv): the Cartpoles' are in [0, 0.05]
    # per step; the velocity tasks' at most 0.12 (tracking and posture terms weighing 6, times 0.02 s), so
    # 0.5 keeps their returns within PQL-D's support. The legged robots keep Args' GPU-sized defaults,
    # which are also mjlab's own PPO networks (512-256-128, ELU) and the paper's locomotion settings.
    "mjlab:Mjlab-Cartpole-Balance": dict(reward_scale=2.0),
    "mjlab:Mjlab-Cartpole-Swingup": dict(reward_scale=2.0),
    "mjlab:Mjlab-Velocity-Flat-Unitree-Go1": dict(reward_scale=0.5),
    "mjlab:Mjlab-Velocity-Rough-Unitree-Go1": dict(reward_scale=0.5),
    "mjlab:Mjlab-Velocity-Flat-Unitree-G1": dict(reward_scale=0.5),
    "mjlab:Mjlab-Velocity-Rough-Unitree-G1": dict(reward_scale=0.5),
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    """The command line's Args, on top of the defaults of the task it names (TASK_DEFAULTS)."""
    task_flag = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    task_flag.add_argument("--task", nargs="?", default=Args.task)  # a bare --task: tyro reports it below
    task = task_flag.parse_known_args(argv)[0].task
    return tyro.cli(Args, args=argv, default=Args(**TASK_DEFAULTS.get(task, {})))


def torch_release():
    """(major, minor) of this torch, as numbers: "2.13.0+cpu" is (2, 13), after (2, 5), and a pre-release or
    a vendor's build ("2.5.0a0+git...") counts as its release."""
    major, minor = str(torch.__version__).split(".")[:2]
    return int(major), int(minor)


def validate_args(args):
    """Fail before any work starts, naming the flag and the allowed values."""
    checks = [
        (args.num_envs >= 1, "--num-envs must be >= 1"),
        (args.total_timesteps >= 1, "--total-timesteps must be >= 1"),
        (args.max_time > 0, "--max-time must be > 0 seconds"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.buffer_size >= args.num_envs,
         f"--buffer-size ({args.buffer_size}) must be >= --num-envs ({args.num_envs}): one row per env at least"),
        (args.batch_size <= args.buffer_size,
         f"--batch-size ({args.batch_size}) must be <= --buffer-size ({args.buffer_size})"),
        (args.nstep >= 1, "--nstep must be >= 1"),
        (0.0 <= args.gamma <= 1.0, "--gamma must be in [0, 1]"),
        (0.0 < args.tau <= 1.0, "--tau must be in (0, 1]"),
        (args.pre_tanh_bound > 0.0, f"--pre-tanh-bound must be > 0 (inf: no penalty), got {args.pre_tanh_bound}"),
        (args.critic_lr > 0, "--critic-lr must be > 0"),
        (args.actor_lr > 0, "--actor-lr must be > 0"),
        (args.max_grad_norm > 0, "--max-grad-norm must be > 0"),
        (len(args.hidden_dims) >= 1 and min(args.hidden_dims) >= 1,
         "--hidden-dims needs at least one layer, each of size >= 1"),
        (args.warmup_iterations >= 0, "--warmup-iterations must be >= 0"),
        (args.v_updates_per_env_step >= 1, "--v-updates-per-env-step must be >= 1"),
        (args.v_updates_per_p_update >= 1, "--v-updates-per-p-update must be >= 1"),
        (0.0 <= args.std_min <= args.std_max,
         f"--std-min ({args.std_min}) must be >= 0 and <= --std-max ({args.std_max})"),
        (args.target_policy_noise >= 0, "--target-policy-noise must be >= 0"),
        (args.target_noise_clip >= 0, "--target-noise-clip must be >= 0"),
        (args.obs_clip > 0, "--obs-clip must be > 0"),
        (args.reward_scale is None or args.reward_scale > 0, "--reward-scale must be > 0"),
        (args.num_atoms >= 2, "--num-atoms must be >= 2"),
        (args.v_min < args.v_max, f"--v-min ({args.v_min}) must be < --v-max ({args.v_max})"),
        (args.log_interval >= 1, "--log-interval must be >= 1"),
        (args.save_interval > 0, "--save-interval must be > 0 seconds"),
        (args.eval_episodes >= 1, "--eval-episodes must be >= 1"),
        (args.eval_envs is None or args.eval_envs >= 0, "--eval-envs must be >= 0"),
        (not (args.eval_envs and args.task.startswith("isaacgym:")),
         "--eval-envs must be 0 for isaacgym tasks: Isaac Gym runs one simulator per process"),
        # Torch 2.4's compiler (TorchDynamo) guards on the gradients' identity and recompiles the updates
        # at every step until its cache is full, then runs them uncompiled; 2.5 and later do not (docs/usage.md).
        (not args.compile or torch_release() >= (2, 5), f"--compile needs torch 2.5 or newer (this is torch {torch.__version__})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def resolve_device(name, flag="--device"):
    """The torch.device that `flag` names, with an index on CUDA (`cuda` is the current GPU): a
    thread that enters another GPU's stream changes its current device, so an index-less `cuda`
    could later mean another GPU than the one the user meant."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: CUDA is not available on this machine (try {flag} cpu)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def note_if_sized_for_a_gpu(args, device):
    """The default sizes (4096 envs, batch 8192, networks 512-256-128) are made for a GPU; on a CPU
    they run, slowly. Say so once, with the command that suits a CPU."""
    if device.type == "cpu" and args.num_envs >= 1024:
        script = os.path.basename(sys.argv[0]) or "pql.py"
        print(f"note: --num-envs {args.num_envs} is sized for a GPU and is slow on a CPU; the CPU quick start is"
              f" `python {script} --task Pendulum --num-envs 64 --hidden-dims 64 64 --batch-size 1024"
              " --total-timesteps 100000`", file=sys.stderr)


def check_buffer_fits(num_bytes, device):
    """A replay buffer that does not fit should fail now with its size, not later with an OOM."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
    else:
        free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if num_bytes > 0.9 * free_bytes:
        raise ValueError(
            f"the replay buffer needs {num_bytes / 2**30:.2f} GiB but {device} has {free_bytes / 2**30:.2f} GiB free;"
            " lower --buffer-size"
        )


def save_checkpoint(path, actor, critic, critic_target, obs_normalizer, args, global_step):
    """Write to a temporary file, then rename: a crash never leaves a half-written model.pt. Refuse
    (return False, write nothing) if any weight or statistic is not finite, so a run that diverged
    keeps its last good checkpoint."""
    checkpoint = {
        "actor": actor.state_dict(),
        "critic": critic.state_dict(),
        "critic_target": critic_target.state_dict(),
        "obs_normalizer": obs_normalizer.state_dict(),
        "args": dataclasses.asdict(args),
        "global_step": global_step,
    }
    tensors = [tensor for part in ["actor", "critic", "critic_target", "obs_normalizer"] for tensor in checkpoint[part].values()]
    if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors if tensor.is_floating_point()):
        return False
    tmp_path = path + ".tmp"
    torch.save(checkpoint, tmp_path)
    os.replace(tmp_path, path)
    return True


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, a SLURM time limit and a container stop send), raised in the main
    thread by `on_stop_signal` and handled like Ctrl-C: save the checkpoint, then exit (143)."""


STOPPING = False  # set by the first Ctrl-C or SIGTERM, and when the run starts its final save
IN_TRAINING_LOOP = False  # set when the training loop starts: from then on a stop signal is only recorded
STOP_SIGNAL = None  # the Ctrl-C (SIGINT) or SIGTERM recorded for the training loop to stop at


def on_stop_signal(signum, frame):
    """Ctrl-C (SIGINT) or SIGTERM: the first stops the run, which saves the checkpoint and exits (130
    or 143). In the training loop it is only recorded (STOP_SIGNAL), and the loop stops at the end
    of its iteration: an exception raised there at an arbitrary bytecode could land inside a
    library's bookkeeping (TensorBoard's event queue, tqdm's locks), and a lock left held or a queue
    count left wrong can hang the exit. Before the loop (setting up) it raises KeyboardInterrupt, or
    Terminated for SIGTERM. One that comes while the run is stopping or saving is reported and ignored,
    so that a second Ctrl-C cannot cut the save short; kill -9 still ends the process at once, and
    the checkpoint on disk stays whole (saves are atomic)."""
    global STOP_SIGNAL
    if STOPPING:
        # os.write, not print: a print here could land inside a print of the interrupted code,
        # which Python refuses (a reentrant call on sys.stderr's buffer).
        os.write(2, f"\n{signal.Signals(signum).name} ignored: the run is saving its checkpoint, then exits\n".encode())
        return
    stopping()
    if IN_TRAINING_LOOP:
        STOP_SIGNAL = signal.Signals(signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_signals_end_the_loop():
    """From here on Ctrl-C and SIGTERM are recorded in STOP_SIGNAL, which the training loop checks
    once per iteration, and no longer raised (on_stop_signal)."""
    global IN_TRAINING_LOOP
    IN_TRAINING_LOOP = True


def stopping():
    """From here on the run only saves and exits: Ctrl-C and SIGTERM are ignored (on_stop_signal)."""
    global STOPPING
    STOPPING = True


def exit_ignoring_stop_signals(exit_code):
    """sys.exit, with Ctrl-C and SIGTERM ignored from here on. On its way out the interpreter puts
    back the default action of every handler Python installed (but leaves an ignored signal
    ignored), and a Ctrl-C then would end the saved, exiting run by that signal instead of its
    exit code."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)
    sys.exit(exit_code)


def catch_stop_signals():
    """Ctrl-C and SIGTERM go to on_stop_signal from here on."""
    global STOPPING, IN_TRAINING_LOOP, STOP_SIGNAL
    STOPPING, IN_TRAINING_LOOP, STOP_SIGNAL = False, False, None
    signal.signal(signal.SIGTERM, on_stop_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a shell starts background jobs with Ctrl-C ignored: keep that
        signal.signal(signal.SIGINT, on_stop_signal)


def progress_bar(total):
    """A progress bar that refreshes ten times a second on a terminal, and once a minute when the
    output goes to a log file, which would otherwise fill with refreshes. miniters=1: without it,
    tqdm's monitor thread, which wakes every ten seconds, adds a refresh between those (two a minute)."""
    on_terminal = sys.stderr.isatty()
    return tqdm(total=total, unit="step", unit_scale=True, dynamic_ncols=True, miniters=1,
                mininterval=0.1 if on_terminal else 60.0)


def start_run(args, reward_scale):
    """TensorBoard writer under runs/{run_name}/ with the hyperparameters as a text table."""
    WARNED_ABOUT_SUPPORT.clear()  # each run warns once: a second run in one process (tests, a notebook) too
    run_name = f"{args.task.replace(':', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        + f"\n|resolved reward_scale|{reward_scale}|",
    )
    return writer, os.path.join(run_dir, "model.pt")


WARNED_ABOUT_SUPPORT = []


def write_scalars(writer, values, global_step, v_updates, elapsed, mean_return, progress, args):
    """Write the scalars CleanRL's tools expect from sums over the last logging interval, and
    return the latest mean return."""
    if values["episodes"] > 0:
        mean_return = values["return_sum"] / values["episodes"]
        writer.add_scalar("charts/episodic_return", mean_return, global_step)
        writer.add_scalar("charts/episodic_length", values["length_sum"] / values["episodes"], global_step)
    if values["v_updates"] > 0:
        writer.add_scalar("losses/critic_loss", values["critic_loss"] / values["v_updates"], global_step)
        writer.add_scalar("losses/q_mean", values["q_mean"] / values["v_updates"], global_step)
        if args.distributional:
            outside = values["outside_support"] / values["v_updates"]
            writer.add_scalar("losses/target_outside_support", outside, global_step)
            if outside > 0.05 and not WARNED_ABOUT_SUPPORT:
                WARNED_ABOUT_SUPPORT.append(True)  # once per run; the scalar above keeps the record
                progress.write(f"warning: {outside:.0%} of the critic's targets fell outside [--v-min, --v-max] ="
                               f" [{args.v_min}, {args.v_max}] at env step {global_step}; scale rewards with --reward-scale"
                               " or widen the support")
    if values["p_updates"] > 0:
        writer.add_scalar("losses/actor_loss", values["actor_loss"] / values["p_updates"], global_step)
    if values["eval_episodes"] > 0:
        writer.add_scalar("eval/episodic_return", values["eval_return_sum"] / values["eval_episodes"], global_step)
    writer.add_scalar("charts/SPS", global_step / elapsed, global_step)
    writer.add_scalar("charts/v_updates_per_s", v_updates / elapsed, global_step)
    progress.set_postfix(SPS=f"{global_step / elapsed:.0f}", ret=f"{mean_return:.1f}", refresh=False)
    return mean_return


# ---------------------------------------------------------------------------------------------
# Observation normalizer: running mean and variance over every observed batch
# ---------------------------------------------------------------------------------------------
class ObsNormalizer:
    """Running mean/variance of the observations (Chan et al.'s parallel update).

    The replay buffer stores raw observations; they are normalized when they are used, with the
    latest statistics, so old data does not carry stale normalization.
    """

    def __init__(self, obs_dim, clip, device):
        self.mean = torch.zeros(obs_dim, dtype=torch.float64, device=device)
        self.var = torch.ones(obs_dim, dtype=torch.float64, device=device)
        # The public code starts the count at 1e-4, a pseudo-observation at mean 0 that biases the
        # variance of features with a large mean and a small spread; 0 is exact (the first update
        # divides by the batch size) and the statistics before it give the identity.
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.clip = clip

    @torch.no_grad()
    def update(self, obs):
        batch = obs.to(torch.float64)
        batch_mean, batch_var, batch_count = batch.mean(0), batch.var(0, unbiased=False), batch.shape[0]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean += delta * batch_count / total
        self.var.copy_((self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total) / total)
        self.count.copy_(total)

    def normalize(self, obs):
        std = torch.sqrt(self.var + 1e-8)
        return ((obs - self.mean.float()) / std.float()).clamp(-self.clip, self.clip)

    def state_dict(self):
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state):
        self.mean.copy_(state["mean"])
        self.var.copy_(state["var"])
        self.count.copy_(state["count"])


# ---------------------------------------------------------------------------------------------
# Replay buffer on the device, with n-step returns computed at sample time
# ---------------------------------------------------------------------------------------------
class ReplayBuffer:
    """One ring of `capacity` rows per environment: tensors shaped (num_envs, capacity, ...).

    Every env step writes one column (row `pos` of every env), so each env's rows are its own
    trajectory in time order, and an n-step window is simply the next n rows of the same env.
    `next_obs` holds the observation to bootstrap from: the true last observation where an
    episode ended (info["final_obs"]), so time-limit ends can be bootstrapped correctly.
    """

    def __init__(self, num_envs, capacity, obs_dim, act_dim, device, overwrite_guard=0):
        self.num_envs, self.capacity, self.device = num_envs, capacity, device
        # The oldest `overwrite_guard` rows are never sampled: a writer running in parallel may be
        # overwriting them (pql_threaded.py). Here writes and reads take turns, so it is 0.
        self.overwrite_guard = overwrite_guard
        self.obs = torch.zeros(num_envs, capacity, obs_dim, device=device)
        self.actions = torch.zeros(num_envs, capacity, act_dim, device=device)
        self.rewards = torch.zeros(num_envs, capacity, device=device)
        self.next_obs = torch.zeros(num_envs, capacity, obs_dim, device=device)
        self.terminated = torch.zeros(num_envs, capacity, device=device)  # 1: no bootstrapping
        self.episode_ended = torch.zeros(num_envs, capacity, device=device)  # terminated or truncated
        self.valid = torch.zeros(num_envs, capacity, device=device)  # 0: not a real transition (Isaac Gym's lazy reset)
        self.pos = 0  # the column the next env step is written to
        self.size = 0  # number of columns written so far (at most capacity)
        # The same two numbers on the device, as sampling reads them: [pos, rows that may be
        # sampled]. A captured update (--cuda-graphs) cannot take new Python numbers at each replay.
        self.window = self.new_window()

    @staticmethod
    def bytes_needed(num_envs, capacity, obs_dim, act_dim):
        return 4 * num_envs * capacity * (2 * obs_dim + act_dim + 4)

    def add(self, obs, actions, rewards, next_obs, terminated, truncated, valid):
        self.obs[:, self.pos] = obs
        self.actions[:, self.pos] = actions
        self.rewards[:, self.pos] = rewards
        self.next_obs[:, self.pos] = next_obs
        self.terminated[:, self.pos] = terminated.float()
        self.episode_ended[:, self.pos] = (terminated | truncated).float()
        self.valid[:, self.pos] = valid.float()
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.fill_window(self.window)

    def new_window(self):
        return torch.zeros(2, dtype=torch.long, device=self.device)

    def fill_window(self, window):
        """Write [pos, rows that may be sampled] into `window`, a pair of device scalars: the
        sampling window, which bounds where samples start (each sample's n-step window is another thing)."""
        window[0].fill_(self.pos)
        window[1].fill_(min(self.size, self.capacity - self.overwrite_guard))

    def sample(self, draws, nstep, gamma, window):
        return self.gather(*self.sample_rows(draws, window), nstep, gamma)

    def sample_obs(self, draws, window):
        """Observations only: the P-learner needs no n-step windows."""
        env_index, start, _ = self.sample_rows(draws, window)
        return self.obs.flatten(0, 1).index_select(0, env_index * self.capacity + start)

    def sample_rows(self, draws, window):
        """Uniformly random (env, row) pairs among the rows that `window` allows, one per sample of
        `draws` (RandomDraws), and each row's age (0: the newest row). Everything stays on the
        device: the age is a large random integer modulo the device-held number of rows (its bias,
        under rows / 2^62, is nil), as no random draw can take a device-held bound."""
        pos, sampleable_rows = window[0], window[1]
        age = draws.large_integer % sampleable_rows
        return draws.env_index, (pos - 1 - age) % self.capacity, age

    def gather(self, env_index, start, age, nstep, gamma):
        """The n-step transitions starting at row `start` of each env, `age` rows before its newest.

        Returns obs, actions, the discounted reward sum over the n-step window, the observation to
        bootstrap from, its discount (gamma^k, or 0 if the window ends in a termination) and the
        valid flag. The n-step window is shorter than n (k < n) where the episode ends inside it, or
        where the rows after it are not written yet.
        """
        offsets = torch.arange(nstep, device=self.device)
        # Row r of env e is row e * capacity + r of each tensor with its first two dimensions
        # flattened (views, no copy), gathered with index_select: on the CPU several times faster
        # than indexing two dimensions, and than tensor[rows] too (its kernel is the general one).
        rows = env_index[:, None] * self.capacity + (start[:, None] + offsets) % self.capacity  # (batch, nstep)
        first_row = rows[:, 0]
        written = offsets[None, :] <= age[:, None]  # rows newer than the newest do not exist yet
        ended = self.episode_ended.flatten().index_select(0, rows.flatten()).view(rows.shape)
        ended_earlier = (torch.cumsum(ended, dim=1) - ended) > 0  # an earlier row of the window ended the episode
        in_window = (written & ~ended_earlier).float()
        n_step_reward = (self.rewards.flatten().index_select(0, rows.flatten()).view(rows.shape) * gamma ** offsets * in_window).sum(1)
        window_length = in_window.sum(1).long()  # k >= 1: the first row is always in the window
        last_row = rows.gather(1, (window_length - 1)[:, None]).squeeze(1)
        bootstrap_obs = self.next_obs.flatten(0, 1).index_select(0, last_row)
        discount = gamma ** window_length.float() * (1.0 - self.terminated.flatten().index_select(0, last_row))
        return (
            self.obs.flatten(0, 1).index_select(0, first_row),
            self.actions.flatten(0, 1).index_select(0, first_row),
            n_step_reward,
            bootstrap_obs,
            discount,
            self.valid.flatten().index_select(0, first_row),
        )


class RandomDraws:
    """The random numbers of one learner update, drawn into fixed tensors just before it runs:
    which env and which row each sample comes from, and (V-learner) the target policy noise.

    Drawn outside the update, so that the update itself draws nothing: replayed from a CUDA graph
    (--cuda-graphs) it then takes no state from the GPU's random generator, and in pql_threaded.py
    the two learners' graphs can run at the same time on their own streams (docs/gpu.md).
    `generator`: a torch.Generator on `device` to draw from, or None for torch's global one.
    """

    def __init__(self, batch_size, num_envs, noise_dim, device, generator=None):
        self.num_envs, self.generator = num_envs, generator
        self.env_index = torch.zeros(batch_size, dtype=torch.long, device=device)  # uniform over the envs
        self.large_integer = torch.zeros(batch_size, dtype=torch.long, device=device)  # uniform in [0, 2^62): a row's age, modulo the rows
        self.target_noise = torch.zeros(batch_size, noise_dim, device=device)  # N(0, 1); noise_dim 0 for the P-learner

    def draw(self):
        self.env_index.random_(0, self.num_envs, generator=self.generator)
        self.large_integer.random_(0, 2**62, generator=self.generator)
        self.target_noise.normal_(generator=self.generator)


# ---------------------------------------------------------------------------------------------
# Networks: a deterministic tanh policy and a twin Q critic
# ---------------------------------------------------------------------------------------------
def mlp(in_dim, hidden_dims, out_dim):
    layers, dim = [], in_dim
    for hidden_dim in hidden_dims:
        layers += [nn.Linear(dim, hidden_dim), nn.ELU()]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    def __init__(self, obs_dim, act_dim, hidden_dims):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, act_dim)

    def forward(self, obs):
        return torch.tanh(self.net(obs))  # actions in [-1, 1], the envs' convention


class TwinMLP(nn.Module):
    """Two independent MLPs of the same shape as `mlp` builds them (ELU between layers), run as
    one: each layer holds both networks' weights stacked, (2, in, out), and one batched matrix
    product applies them (a layer with one output, an elementwise product and a sum). The twin
    critic then costs the kernel launches of one network, and its optimizer, gradient clipping and
    target update handle half as many tensors: on a GPU, updates at the sizes PQL uses are bound by
    launches rather than arithmetic (benchmarks/update_speed.py).
    Each network is initialised as nn.Linear initialises its layers."""

    def __init__(self, in_dim, hidden_dims, out_dim):
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(2, d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(2, 1, d_out)) for d_out in dims[1:]])
        for weight, bias in zip(self.weights, self.biases):
            bound = 1.0 / math.sqrt(weight.shape[1])  # nn.Linear's: uniform in +- 1/sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x):
        """x: (batch, in_dim), the input of both networks. Returns (2, batch, out_dim)."""
        x = x.expand(2, *x.shape)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if weight.shape[2] == 1:
                # One output column (a scalar Q): as a product and a sum over the inputs. The CPU's
                # batched matrix product is several times slower at one column (docs/results.md).
                x = (x * weight.transpose(1, 2)).sum(2, keepdim=True) + bias
            else:
                x = torch.baddbmm(bias, x, weight)
            if layer < len(self.weights) - 1:
                x = nn.functional.elu(x, inplace=True)  # in place: nothing needs the product itself again
        return x.float()  # float32 Q values and logits under --bf16 too: the losses are computed from them


class Critic(nn.Module):
    """Two independent Q networks on concat(obs, action) (clipped double Q, Fujimoto et al. 2018).

    Scalar critic: each head outputs Q. Distributional critic (PQL-D): each head outputs the
    logits of a categorical distribution over `num_atoms` fixed returns spread evenly over
    [v_min, v_max] (C51, Bellemare et al. 2017), and Q is the mean of that distribution.
    """

    def __init__(self, obs_dim, act_dim, hidden_dims, distributional=False, num_atoms=51, v_min=-10.0, v_max=10.0):
        super().__init__()
        self.distributional = distributional
        outputs = num_atoms if distributional else 1
        self.q_heads = TwinMLP(obs_dim + act_dim, hidden_dims, outputs)  # heads 0 and 1: Q1 and Q2
        # A buffer moves with .to(device) and is saved with the weights; the public code kept the
        # atoms in a plain tensor attribute, which stayed behind and crashed PQL-D on one GPU.
        self.register_buffer("atoms", torch.linspace(v_min, v_max, outputs))

    def logits(self, obs, actions):
        """Both heads' outputs, stacked: (2, batch, outputs); head 0 is Q1, head 1 Q2."""
        return self.q_heads(torch.cat([obs, actions], dim=1))

    def forward(self, obs, actions):
        """Both heads' Q values, stacked: (2, batch). Kept together, each loss handles both heads
        in the ops of one (a min over dim 0 is clipped double Q)."""
        outputs = self.logits(obs, actions)
        if not self.distributional:
            return outputs.squeeze(2)
        return self.mean_value(outputs)

    def mean_value(self, logits):
        return (torch.softmax(logits, dim=-1) * self.atoms).sum(-1)


def make_critic(obs_dim, act_dim, args):
    return Critic(obs_dim, act_dim, args.hidden_dims, args.distributional, args.num_atoms, args.v_min, args.v_max)


def project_onto_atoms(next_probs, n_step_reward, discount, atoms):
    """C51's projection: the distribution of n_step_reward + discount * Z, where Z has
    probabilities `next_probs` on `atoms`, put back onto the same atoms.

    Each shifted atom lands between two atoms and splits its mass between them in proportion to
    closeness; values beyond the support are clamped to its ends. When a shifted atom lands
    exactly on an atom, lower == upper and upper_weight == 0, so its mass is counted once (a
    vectorised projection that builds both neighbour masks first would count it twice).
    A discount of 0 (termination) collapses the whole distribution onto n_step_reward.
    """
    v_min, v_max, num_atoms = atoms[0], atoms[-1], atoms.shape[0]
    shifted = (n_step_reward[:, None] + discount[:, None] * atoms[None, :]).clamp(v_min, v_max)
    position = (shifted - v_min) / (v_max - v_min) * (num_atoms - 1)  # in [0, num_atoms - 1]
    lower = position.floor().clamp(0, num_atoms - 1)
    upper_weight = position - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=num_atoms - 1)
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower, next_probs * (1.0 - upper_weight))
    projected.scatter_add_(1, upper, next_probs * upper_weight)
    return projected


def copy_weights(source, destination):
    """Hand a network from one role to another: overwrite the destination's parameters in place.
    Only a copy between GPUs may return before it has landed: toward the CPU the values are needed
    as soon as the call returns, and from the CPU the source may change as soon as it returns."""
    with torch.no_grad():
        for src, dst in zip(source.state_dict().values(), destination.state_dict().values()):
            dst.copy_(src, non_blocking=src.is_cuda and dst.is_cuda)


# ---------------------------------------------------------------------------------------------
# The actor role: data collection with mixed exploration
# ---------------------------------------------------------------------------------------------
def exploration_stds(num_envs, std_min, std_max, device):
    """Mixed exploration (paper, Sec. 3.3): env i always uses noise std sigma_i, spread evenly
    over [std_min, std_max], so one batch of envs explores at many scales at once."""
    return torch.linspace(std_min, std_max, num_envs, device=device)


@torch.no_grad()
def explore(policy, obs_normalizer, obs, noise_stds):
    actions = policy(obs_normalizer.normalize(obs))
    noise = torch.randn_like(actions) * noise_stds[:, None]
    return (actions + noise).clamp(-1.0, 1.0)


def make_eval_env(args, device):
    """A few envs of their own for the deterministic policy, stepped once per iteration beside the
    training envs: the training return mixes in exploration noise up to std 0.8, this one does not.
    No evaluation envs by default for the simulators' tasks: Isaac Gym runs one simulator per process, and a second
    mjlab simulator's step costs much of what the training envs' does, however few its envs (on a
    2-core CPU, Mjlab-Cartpole-Balance: 16 ms for 4 envs, 24 ms for 256)."""
    num_eval_envs = args.eval_envs if args.eval_envs is not None else (0 if args.task.startswith(("isaacgym:", "mjlab:")) else 4)
    if num_eval_envs == 0:
        return None
    eval_env = envs.make_env(args.task, num_eval_envs, device=device, seed=args.seed + 10_000)
    eval_env.check_finite_actions = False  # the policy's actions are checked through the training envs
    return eval_env


@torch.no_grad()
def evaluation_step(eval_env, eval_obs, policy, obs_normalizer, stats):
    """One step of the evaluation envs with the deterministic policy; the returns of the episodes
    that end are summed into stats. Returns the next observations."""
    eval_obs, _, terminated, truncated, info = eval_env.step(policy(obs_normalizer.normalize(eval_obs)))
    ended = (terminated | truncated).float()
    stats["eval_return_sum"] += (info["episode_return"] * ended).sum()
    stats["eval_episodes"] += ended.sum()
    return eval_obs


# ---------------------------------------------------------------------------------------------
# The V-learner: one critic update
# ---------------------------------------------------------------------------------------------
def bf16_autocast(args, device):
    """With --bf16, the networks' matrix products (and so their hidden layers) in bfloat16 inside
    this block, as FastTD3 trains; otherwise nothing changes. Autocast's cache of cast weights stays
    off: a CUDA graph cannot record it, and each update casts the weights it has just changed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16, cache_enabled=False)


def clip_grad_norm(module, max_norm):
    """Scale all of `module`'s gradients down together so that their total 2-norm is at most
    max_norm: nn.utils.clip_grad_norm_'s arithmetic, in its ops (one multi-tensor norm, one
    multi-tensor scale), without its Python bookkeeping (grouping tensors by device and dtype),
    which at PQL's sizes took longer on the CPU than the arithmetic (docs/results.md)."""
    grads = [param.grad for param in module.parameters()]
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total_norm + 1e-6)).clamp(max=1.0))


def update_critic(critic, critic_target, critic_optimizer, target_policy, obs_normalizer, batch, target_noise, args):
    """One critic update on `batch` (ReplayBuffer.gather); target_noise: N(0, 1), shaped like the actions."""
    obs, actions, n_step_reward, bootstrap_obs, discount, valid = batch
    obs, bootstrap_obs = obs_normalizer.normalize(obs), obs_normalizer.normalize(bootstrap_obs)
    with torch.no_grad(), bf16_autocast(args, obs.device):
        # Target policy smoothing (TD3); PQL has no target actor: the latest policy copy acts.
        next_actions = target_policy(bootstrap_obs)
        noise = (target_noise * args.target_policy_noise).clamp(-args.target_noise_clip, args.target_noise_clip)
        next_actions = (next_actions + noise).clamp(-1.0, 1.0)
        if critic.distributional:
            # Clipped double Q for distributions: per sample, take the target critic whose mean is
            # lower (as FastTD3 does), project its shifted distribution and train both heads on it
            # with cross-entropy, the C51 loss. The public code instead takes the element-wise min
            # of the two projected distributions, which no longer sums to 1, under a binary
            # cross-entropy loss; we keep the standard, proper distribution.
            logits = critic_target.logits(bootstrap_obs, next_actions)  # (2, batch, atoms)
            means = critic_target.mean_value(logits)
            next_probs = torch.softmax(torch.where((means[0] < means[1])[:, None], logits[0], logits[1]), dim=1)
            target_probs = project_onto_atoms(next_probs, n_step_reward, discount, critic.atoms)
            target_mean = n_step_reward + discount * (next_probs * critic.atoms).sum(1)
            outside_support = ((target_mean < args.v_min) | (target_mean > args.v_max)).float().mean()
        else:
            target = n_step_reward + discount * critic_target(bootstrap_obs, next_actions).amin(0)  # clipped double Q: the lower head
            outside_support = torch.zeros((), device=obs.device)
    with bf16_autocast(args, obs.device):
        both_heads = critic.logits(obs, actions) if critic.distributional else critic(obs, actions)  # (2, batch[, atoms])
    if critic.distributional:
        errors = -(target_probs * torch.log_softmax(both_heads, dim=2)).sum((0, 2))  # the two heads' cross-entropies
        q1 = critic.mean_value(both_heads[0])
    else:
        errors = ((both_heads - target) ** 2).sum(0)  # the two heads' squared errors
        q1 = both_heads[0]
    # `valid` masks the rare rows that are not real transitions (see envs.py, Isaac Gym adapter).
    critic_loss = (valid * errors).sum() / valid.sum().clamp(min=1.0)
    critic_optimizer.zero_grad(set_to_none=True)
    critic_loss.backward()
    clip_grad_norm(critic, args.max_grad_norm)
    critic_optimizer.step()
    with torch.no_grad():  # Polyak averaging after every V-update, one multi-tensor op for all weights
        torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.tau)
    return critic_loss.detach(), q1.detach().mean(), outside_support


# ---------------------------------------------------------------------------------------------
# The P-learner: one policy update
# ---------------------------------------------------------------------------------------------
def update_actor(actor, actor_optimizer, policy_critic, obs_normalizer, obs, args):
    obs = obs_normalizer.normalize(obs)
    with bf16_autocast(args, obs.device):
        pre_tanh = actor.net(obs).float()  # float32 under --bf16 too, for the bound below
        q_values = policy_critic(obs, torch.tanh(pre_tanh))  # policy_critic is a frozen copy: no critic gradients
    actor_loss = -q_values.amin(0).mean()  # the lower of the two heads' Q, as in the target
    if args.pre_tanh_bound != float("inf"):
        # Past |pre_tanh| ~ 3 the tanh is flat (slope < 0.01; 3e-6 at 7), so the critic's gradient
        # cannot move the policy there any more: a Pendulum policy stuck at full torque below the
        # horizontal stays stuck although its critic rates the opposite torque higher
        # (docs/pendulum_seeds.md). The penalty is zero inside the bound.
        actor_loss = actor_loss + ((pre_tanh.abs() - args.pre_tanh_bound).clamp(min=0.0) ** 2).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    clip_grad_norm(actor, args.max_grad_norm)
    actor_optimizer.step()
    return actor_loss.detach()


# ---------------------------------------------------------------------------------------------
# Fewer launches: optimizers, the learners' steps as units, CUDA graphs
# ---------------------------------------------------------------------------------------------
def make_optimizer(parameters, lr, capturable):
    """AdamW in one fused kernel per step where this torch has one for the device (CUDA from torch
    2.0, CPU from 2.4), else in one multi-tensor (foreach) op per step, never a loop over the
    weights. `capturable` keeps AdamW's step counts on the device, as a CUDA graph needs. The weight
    decay is AdamW's default, which the public code used without naming it."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, fused=True, capturable=capturable)
    except RuntimeError:  # no fused AdamW for this device in this torch
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, foreach=True, capturable=capturable)


def v_learner_step(replay_buffer, window, draws, critic, critic_target, critic_optimizer, target_policy, obs_normalizer, stats, args):
    """One V-update with its sampling, its statistics summed into `stats` on the device: the unit
    that --compile compiles and --cuda-graphs records. Its random numbers are `draws`, drawn
    before each call (RandomDraws.draw)."""
    batch = replay_buffer.sample(draws, args.nstep, args.gamma, window)
    critic_loss, q_mean, outside_support = update_critic(critic, critic_target, critic_optimizer, target_policy, obs_normalizer, batch,
                                                         draws.target_noise, args)
    stats["critic_loss"] += critic_loss
    stats["q_mean"] += q_mean
    stats["outside_support"] += outside_support
    stats["critic_nonfinite"] += ~torch.isfinite(critic_loss)


def p_learner_step(replay_buffer, window, draws, actor, actor_optimizer, policy_critic, obs_normalizer, stats, args):
    """One P-update with its sampling and statistics, as v_learner_step."""
    device = stats["actor_loss"].device  # the P-learner's, which may not be the replay buffer's
    # Toward a GPU the copy may run behind; toward the CPU the values are needed at once.
    obs_batch = replay_buffer.sample_obs(draws, window).to(device, non_blocking=device.type == "cuda")
    actor_loss = update_actor(actor, actor_optimizer, policy_critic, obs_normalizer, obs_batch, args)
    stats["actor_loss"] += actor_loss
    stats["actor_nonfinite"] += ~torch.isfinite(actor_loss)


def capture_cuda_graph(step, state, optimizer, device):
    """Record step() as a CUDA graph and return the function that replays it: a whole update in one
    launch (PyTorch's "whole-network capture"). A replay runs the same kernels on the same memory,
    so everything a step touches stays where it is (weights, optimizer state, statistics, the
    replay buffer and its sampling window) and only the values there change.

    Capture needs a few eager calls first, on a side stream: they create cuBLAS handles, the
    optimizer's state and autograd's buffers. They also train, so `state` (the tensors the step
    changes) and the optimizer are put back afterwards, in place: the run starts where it was. The
    step draws no random numbers (RandomDraws), so the graph holds none either.
    """
    with torch.cuda.device(device):
        saved = [tensor.detach().clone() for tensor in state]
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        # Captured on this call's own side stream: cuBLAS keeps a workspace per stream, and two
        # graphs captured on one stream would share it even when replayed concurrently.
        with torch.cuda.graph(graph, stream=side_stream):
            step()
        put_back(state, saved, optimizer)
    return graph.replay


def put_back(state, saved, optimizer):
    """Undo the calls that only prepared a step (recorded or compiled it): the tensors it changes
    (`state`) get their `saved` values back, in place, and the optimizer is as before its first
    step (no moments, step 0)."""
    with torch.no_grad():
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        for param_state in optimizer.state.values():
            for value in param_state.values():
                value.zero_()


# ---------------------------------------------------------------------------------------------
# Evaluation of a checkpoint
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(checkpoint_path, episodes, device, seed):
    checkpoint = torch.load(checkpoint_path, map_location=device)
    trained = Args(**{k: tuple(v) if k == "hidden_dims" else v for k, v in checkpoint["args"].items() if k in Args.__dataclass_fields__})
    env = envs.make_env(trained.task, episodes, device=device, seed=seed)
    actor = Actor(env.obs_dim, env.act_dim, trained.hidden_dims).to(device)
    actor.load_state_dict(checkpoint["actor"])
    obs_normalizer = ObsNormalizer(env.obs_dim, trained.obs_clip, device)
    obs_normalizer.load_state_dict(checkpoint["obs_normalizer"])
    # One episode per env: run until every env has finished its first episode.
    returns = torch.zeros(episodes, device=device)
    lengths = torch.zeros(episodes, device=device)
    finished = torch.zeros(episodes, dtype=torch.bool, device=device)
    obs = env.reset()
    for _ in range(env.max_episode_length + 2):  # +2: an Isaac Gym lazy reset step, and slack
        obs, _, terminated, truncated, info = env.step(actor(obs_normalizer.normalize(obs)))
        just_finished = (terminated | truncated) & ~finished
        returns = torch.where(just_finished, info["episode_return"], returns)
        lengths = torch.where(just_finished, info["episode_length"], lengths)
        finished |= just_finished
        if bool(finished.all()):
            break
    returns, lengths = returns[finished].cpu(), lengths[finished].cpu()
    print(
        f"{trained.task}: mean return {returns.mean():.2f} +- {returns.std(unbiased=False):.2f}"
        f" over {len(returns)} episodes (mean length {lengths.mean():.1f}), checkpoint {checkpoint_path}"
    )
    return returns


# ---------------------------------------------------------------------------------------------
# Running the roles in parallel: ratios by counting, hand-off of networks, CUDA streams
# ---------------------------------------------------------------------------------------------
ACTOR_LEAD_ITERATIONS = 1  # the actor may run this many iterations ahead of the V-learner's quota
P_LAG_UPDATES = 2  # the V-learner waits when the P-learner falls this many P-updates behind
MAX_UPDATES_IN_FLIGHT = 2  # a learner queues at most this many updates on its GPU stream
JOIN_TIMEOUT = 5.0  # seconds a role gets to stop after the stop signal, before the process gives up on it
GIL_SWITCH_INTERVAL = 0.0005  # seconds a thread that wants the GIL waits for one running Python (Python's default: 0.005)


class Coordinator:
    """Counts the work of the three roles and makes whichever runs ahead wait (paper, Sec. 3.2:
    the ratios beta_a:v and beta_p:v). The public code held them approximately by timing and
    sleeping; counting holds them exactly, whatever the load. Also carries the stop flag and
    the first exception raised in any thread."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        # A condition on that lock for each rule a role waits on (wait_until adds it): a count wakes
        # only the roles whose rule it has made true. Waking every waiting role on every count woke
        # the actor about ten times per iteration for nothing (on the CPU, at toy sizes), each time
        # taking the GIL from a role that had work.
        self.wakeups = {}
        self.iterations = 0  # env steps of all envs written to the replay buffer
        self.v_updates = 0
        self.p_updates = 0
        self.stopping = False
        self.error = None

    # The three rules, evaluated under the lock. No role can deadlock, because the V-learner may
    # run P_LAG_UPDATES >= 1 P-updates ahead of the P-learner (with 0 every setting deadlocks);
    # tests/test_coordination.py explores every interleaving of the three roles to check it.
    def actor_may_step(self):
        # Iteration i may start once the V-learner has done its updates for iteration
        # i - 1 - ACTOR_LEAD_ITERATIONS: the actor collects while the V-learner trains.
        behind = self.iterations - self.args.warmup_iterations - ACTOR_LEAD_ITERATIONS
        return behind <= 0 or self.v_updates >= self.args.v_updates_per_env_step * behind

    def v_learner_may_update(self):
        learning_iterations = self.iterations - self.args.warmup_iterations
        data_allows = self.v_updates < self.args.v_updates_per_env_step * learning_iterations
        p_keeps_up = self.p_updates >= (self.v_updates + 1) // self.args.v_updates_per_p_update - P_LAG_UPDATES
        return data_allows and p_keeps_up

    def p_learner_may_update(self):
        return (self.p_updates + 1) * self.args.v_updates_per_p_update <= self.v_updates

    def wait_until(self, rule, deadline=float("inf")):
        """Block until rule() holds (True), or until the run is stopping or time.time() passes the
        deadline (False): a role stuck on its GPU must not hold the others past the time budget."""
        with self.lock:
            if rule not in self.wakeups:
                self.wakeups[rule] = threading.Condition(self.lock)
            wakeup = self.wakeups[rule]
            while not (self.stopping or rule()):
                if time.time() >= deadline or STOP_SIGNAL is not None:  # Ctrl-C or SIGTERM: the actor's loop stops
                    return False
                wakeup.wait(timeout=0.1)  # the timeout also guards against a lost wake-up
            return not self.stopping

    def count(self, counter):
        with self.lock:
            setattr(self, counter, getattr(self, counter) + 1)
            for rule, wakeup in self.wakeups.items():
                if rule():
                    wakeup.notify_all()

    def stop(self, error=None):
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.stopping = True
            for wakeup in self.wakeups.values():
                wakeup.notify_all()


class Mailbox:
    """Hands the latest weights of one role's networks to the other roles, with no host ever
    waiting for another role's GPU work.

    The owner copies its networks into a snapshot on its own device (`publish`); a consumer copies
    the snapshot into its own network, on any device (`fetch`). On a GPU the copies are ordered by
    CUDA events, not by host waits: the owner records `published` after its copy and the
    consumer's stream waits for it before reading; each consumer records its own event after
    reading, and the owner's stream waits for all of them before it overwrites the snapshot. The
    lock orders the calls themselves, so a version number always matches the snapshot.
    """

    def __init__(self, modules, device):
        self.snapshots = {name: copy.deepcopy(module) for name, module in modules.items()}
        self.device = device
        self.version = 0  # bumped by every publish
        self.lock = threading.Lock()
        self.published = torch.cuda.Event() if device.type == "cuda" else None
        self.finished_reading = {}  # id of a consumer's destination -> its event (on a GPU)

    def publish(self, modules):
        with self.lock:
            if self.published is not None:
                for event in self.finished_reading.values():
                    torch.cuda.current_stream(self.device).wait_event(event)
            for name, module in modules.items():
                copy_weights(module, self.snapshots[name])
            if self.published is not None:
                self.published.record(torch.cuda.current_stream(self.device))
            self.version += 1

    def fetch(self, name, destination, seen_version):
        """Copy the snapshot `name` into destination if it is newer than seen_version; return
        the version the destination now holds."""
        if self.version == seen_version:  # reading an int needs no lock: at worst we copy next time
            return seen_version
        with self.lock:
            self.order_after_publish()
            copy_weights(self.snapshots[name], destination)
            if self.published is not None:
                if id(destination) not in self.finished_reading:
                    self.finished_reading[id(destination)] = torch.cuda.Event()
                # A copy between GPUs runs on the source's stream, so this event covers it too.
                self.finished_reading[id(destination)].record(torch.cuda.current_stream(self.device))
            return self.version

    def order_after_publish(self):
        """Make this thread's stream on the snapshot's device wait (on the GPU, not here on the host)
        until the last publish has landed: what the thread queues on it next reads the new snapshot."""
        if self.published is not None:
            torch.cuda.current_stream(self.device).wait_event(self.published)


class InFlightLimit:
    """Lets a thread queue at most `limit` updates on its CUDA stream before it waits for the
    oldest. The CPU then never runs far ahead of the GPU, so the Coordinator's counts are what
    the GPU has done, give or take `limit` (the overwrite guard of the replay buffer relies on it).
    A fixed ring of events is reused: the one marked `limit` updates ago is waited for, then re-recorded."""

    def __init__(self, device, limit=MAX_UPDATES_IN_FLIGHT):
        self.device, self.marks = device, 0
        # blocking=True: the host thread sleeps in synchronize() instead of spinning a CPU core.
        self.events = [torch.cuda.Event(blocking=True) for _ in range(limit)] if device.type == "cuda" else []

    def mark(self):
        if not self.events:
            return  # on the CPU every operation has finished when it returns
        event = self.events[self.marks % len(self.events)]
        event.synchronize()  # returns at once if the event was never recorded
        event.record(torch.cuda.current_stream(self.device))
        self.marks += 1


def overwrite_guard(args):
    """Rows at the old end of each env's ring that learners must not sample, because the actor
    may be overwriting them while a learner's sample still waits on its GPU stream.

    A learner's sample runs before its counter grows by 1 + MAX_UPDATES_IN_FLIGHT; meanwhile
    the V-learner may do up to v_updates_per_p_update * (1 + MAX_UPDATES_IN_FLIGHT +
    P_LAG_UPDATES) updates more, each worth 1 / v_updates_per_env_step env steps, and the actor
    may lead by ACTOR_LEAD_ITERATIONS + 1: at most this many columns are written meanwhile.
    """
    worst_v_updates = args.v_updates_per_p_update * (1 + MAX_UPDATES_IN_FLIGHT + P_LAG_UPDATES)
    return ACTOR_LEAD_ITERATIONS + 2 + math.ceil(worst_v_updates / args.v_updates_per_env_step)


def role_streams(own_device, *other_devices, keep_default_stream=False):
    """Give this thread its own CUDA stream on each device it uses, so the roles' kernels run
    concurrently instead of queueing on the default stream, and make the role's own device the
    thread's current one (entering a stream makes its device current, so it goes last). Nothing
    on the CPU.

    A new stream does not wait for the default stream, where the main thread made the networks,
    snapshots and statistics before the roles started: each role's stream waits for that work first.

    The actor keeps its own device's default stream (keep_default_stream), where its simulator
    expects torch's work, as in pql.py: mjlab's MuJoCo Warp queues its physics on a stream of its own
    that synchronises with the default stream only, so an actor on a stream of its own would race it
    (Isaac Gym's PhysX likewise has its own streams). PyTorch's streams (torch.cuda.Stream) do not
    synchronise with the default stream, so the learners' kernels still run beside the actor's.
    """
    contexts = contextlib.ExitStack()
    devices = [device for device in dict.fromkeys(other_devices) if device != own_device] + [own_device]
    for device in devices:
        if device.type == "cuda" and not (keep_default_stream and device == own_device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.default_stream(device))
            contexts.enter_context(torch.cuda.stream(stream))
    if own_device.type == "cuda":
        contexts.enter_context(torch.cuda.device(own_device))
    return contexts


class SharedReplay:
    """The replay buffer with the synchronisation its writer and readers need.

    The actor writes a column on its stream, records `written` after it, and only then, under
    the lock, the new column becomes visible (ReplayBuffer.pos/size move in the same critical
    section). A learner, under the same lock, makes its stream wait for `written` and copies
    pos/size into its own sampling window, a pair of device scalars written on its own stream;
    it draws and gathers its rows after releasing the lock, from that window (the buffer's own
    window moves on the actor's stream, unordered with the learner's). So a learner's sample can
    only see columns whose writes come before it on the GPU; and the columns the actor may
    overwrite concurrently are excluded by the buffer's overwrite guard. Together: no sample ever
    reads a half-written row.
    """

    def __init__(self, replay_buffer, coordinator):
        self.buffer, self.coordinator = replay_buffer, coordinator
        self.written = torch.cuda.Event() if replay_buffer.device.type == "cuda" else None

    def add(self, *transition):
        with self.coordinator.lock:
            self.buffer.add(*transition)
            if self.written is not None:
                self.written.record(torch.cuda.current_stream(self.buffer.device))

    def fill_window(self, window):
        with self.coordinator.lock:
            if self.written is not None:
                torch.cuda.current_stream(self.buffer.device).wait_event(self.written)
            self.buffer.fill_window(window)


def run_role(coordinator, role, *role_args):
    """Thread body: run a role; on any exception stop every role and keep it for the main thread."""
    try:
        role(coordinator, *role_args)
    except BaseException as error:  # noqa: B036 -- re-raised by the main thread
        coordinator.stop(error)


def v_learner(coordinator, shared_replay, window, draws, v_step, target_policy, obs_normalizer,
              policy_mailbox, critic_mailbox, normalizer_mailbox, critic, critic_target, device, args):
    with role_streams(device):
        in_flight, policy_version, normalizer_version = InFlightLimit(device), -1, -1
        while coordinator.wait_until(coordinator.v_learner_may_update):
            policy_version = policy_mailbox.fetch("actor", target_policy, policy_version)
            normalizer_version = normalizer_mailbox.fetch("obs_normalizer", obs_normalizer, normalizer_version)
            shared_replay.fill_window(window)
            draws.draw()  # this update's random numbers, on this thread's stream
            v_step()  # sample, update, statistics (v_learner_step), or its CUDA graph
            in_flight.mark()
            coordinator.count("v_updates")
            if coordinator.v_updates % args.sync_interval == 0:
                critic_mailbox.publish({"critic": critic, "critic_target": critic_target})


def p_learner(coordinator, shared_replay, window, draws, p_step, policy_critic, obs_normalizer,
              policy_mailbox, critic_mailbox, normalizer_mailbox, actor, device, args):
    with role_streams(device, shared_replay.buffer.device):
        in_flight, critic_version, normalizer_version = InFlightLimit(device), -1, -1
        while coordinator.wait_until(coordinator.p_learner_may_update):
            critic_version = critic_mailbox.fetch("critic", policy_critic, critic_version)
            normalizer_version = normalizer_mailbox.fetch("obs_normalizer", obs_normalizer, normalizer_version)
            shared_replay.fill_window(window)
            draws.draw()
            p_step()  # sample, update, statistics (p_learner_step), or its CUDA graph
            in_flight.mark()
            coordinator.count("p_updates")
            if coordinator.p_updates % args.sync_interval == 0:
                policy_mailbox.publish({"actor": actor})


# ---------------------------------------------------------------------------------------------
# The main loop: the actor in the main thread, the V-learner and P-learner in their own threads
# ---------------------------------------------------------------------------------------------
def train(args, env, eval_env, devices):
    actor_device, v_device, p_device = devices
    # The loop below watches for non-finite values itself and reports the step where they appeared;
    # the env's own check of the actions would stop it one step later, and costs a host sync.
    env.check_finite_actions = False
    reward_scale = args.reward_scale if args.reward_scale is not None else TASK_DEFAULTS.get(args.task, {}).get("reward_scale", 1.0)
    capacity = args.buffer_size // args.num_envs
    # Graphs need both learners on one CUDA device (docs/gpu.md); elsewhere the updates run eagerly.
    args.cuda_graphs = args.cuda_graphs and devices[1].type == "cuda" and devices[1] == devices[2]
    writer, checkpoint_path = start_run(args, reward_scale)

    # Placement as in the paper: the replay buffer and the critic live with the V-learner.
    obs_normalizer = ObsNormalizer(env.obs_dim, args.obs_clip, actor_device)
    replay_buffer = ReplayBuffer(args.num_envs, capacity, env.obs_dim, env.act_dim, v_device, overwrite_guard(args))
    actor = Actor(env.obs_dim, env.act_dim, args.hidden_dims).to(p_device)
    critic = make_critic(env.obs_dim, env.act_dim, args).to(v_device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    actor_optimizer = make_optimizer(actor.parameters(), args.actor_lr, capturable=args.cuda_graphs)
    critic_optimizer = make_optimizer(critic.parameters(), args.critic_lr, capturable=args.cuda_graphs)
    # Each role acts on its own copy of the networks it does not train (paper, Sec. 3.1).
    acting_policy = copy.deepcopy(actor).requires_grad_(False).to(actor_device)  # the actor role's policy
    target_policy = copy.deepcopy(actor).requires_grad_(False).to(v_device)  # the V-learner's, for target actions
    policy_critic = copy.deepcopy(critic).requires_grad_(False).to(p_device)  # the P-learner's critic
    v_normalizer = ObsNormalizer(env.obs_dim, args.obs_clip, v_device)  # the learners' copies of the statistics
    p_normalizer = ObsNormalizer(env.obs_dim, args.obs_clip, p_device)
    noise_stds = exploration_stds(args.num_envs, args.std_min, args.std_max, actor_device)

    coordinator = Coordinator(args)
    shared_replay = SharedReplay(replay_buffer, coordinator)
    policy_mailbox = Mailbox({"actor": actor}, p_device)
    critic_mailbox = Mailbox({"critic": critic, "critic_target": critic_target}, v_device)
    normalizer_mailbox = Mailbox({"obs_normalizer": obs_normalizer}, actor_device)
    # Each role sums its statistics on its own device (float64: these sums are never reset) and
    # the main thread reads them at logging intervals; a slightly stale read only shifts a log.
    actor_stats = {name: torch.zeros((), dtype=torch.float64, device=actor_device) for name in
                   ["return_sum", "length_sum", "episodes", "eval_return_sum", "eval_episodes"]}
    v_stats = {name: torch.zeros((), dtype=torch.float64, device=v_device) for name in ["critic_loss", "q_mean", "outside_support", "critic_nonfinite"]}
    p_stats = {name: torch.zeros((), dtype=torch.float64, device=p_device) for name in ["actor_loss", "actor_nonfinite"]}
    # Iteration of the first non-finite observation or reward (inf: none yet), kept on the device.
    first_nonfinite_iteration = torch.full((), float("inf"), device=actor_device)

    # The learners' steps as functions of nothing, each sampling through its own window with its
    # own random numbers, drawn before each step (draws.draw()); compiled, or recorded as CUDA
    # graphs, or both (then the recording's warm-up calls compile, and the graph replays the
    # compiled kernels), if asked. Each graph is recorded here, before the threads start (a capture
    # forbids other threads' CUDA work), in a memory pool of its own; a learner then replays it on
    # its own stream: one graph launch per update, and the GIL is free in between. The graphs draw no
    # random numbers, so the two learners' replays can run at the same time.
    v_window, p_window = replay_buffer.new_window(), replay_buffer.new_window()
    # Each learner draws from a generator of its own, not torch's global one, which the actor's thread
    # uses too: an env may swap it out around its calls (mjlab's, envs.PrivateTorchRng) and, restoring
    # it, rewind a learner's draw made meanwhile, so that the next update would draw the same samples.
    # Seeded apart from each other and from the global generator (args.seed).
    v_generator, p_generator = (torch.Generator(device=v_device).manual_seed(args.seed + offset) for offset in (1, 2))
    v_draws = RandomDraws(args.batch_size, args.num_envs, env.act_dim, v_device, v_generator)
    p_draws = RandomDraws(args.batch_size, args.num_envs, 0, v_device, p_generator)  # sampling runs where the buffer is
    v_step, p_step = (torch.compile(v_learner_step), torch.compile(p_learner_step)) if args.compile else (v_learner_step, p_learner_step)
    v_step = functools.partial(v_step, replay_buffer, v_window, v_draws, critic, critic_target, critic_optimizer, target_policy, v_normalizer,
                               v_stats, args)
    p_step = functools.partial(p_step, replay_buffer, p_window, p_draws, actor, actor_optimizer, policy_critic, p_normalizer, p_stats, args)
    v_state = [*critic.parameters(), *critic_target.parameters(), *v_stats.values()]  # what each step changes
    p_state = [*actor.parameters(), *p_stats.values()]
    if args.cuda_graphs:
        # Recorded before any data is in: the eager calls sample the newest row of env 0 (the
        # draws are still zeros; the row is zeros, not valid), then everything they changed is put back.
        v_window.fill_(1)
        p_window.fill_(1)
        v_step = capture_cuda_graph(v_step, v_state, critic_optimizer, v_device)
        p_step = capture_cuda_graph(p_step, p_state, actor_optimizer, p_device)
    elif args.compile:
        # Compiled here too, not on each learner's first update: a Ctrl-C or SIGTERM during a compile
        # (a minute on a CPU) would find a learner that cannot stop within JOIN_TIMEOUT. Three calls,
        # as for a recording (the optimizer's first step takes another path), then put back.
        v_window.fill_(1)
        p_window.fill_(1)
        for step, state, optimizer in [(v_step, v_state, critic_optimizer), (p_step, p_state, actor_optimizer)]:
            saved = [tensor.detach().clone() for tensor in state]
            for _ in range(3):
                step()
            put_back(state, saved, optimizer)

    threads = [
        threading.Thread(target=run_role, name="v-learner", daemon=True, args=(
            coordinator, v_learner, shared_replay, v_window, v_draws, v_step, target_policy, v_normalizer,
            policy_mailbox, critic_mailbox, normalizer_mailbox, critic, critic_target, v_device, args)),
        threading.Thread(target=run_role, name="p-learner", daemon=True, args=(
            coordinator, p_learner, shared_replay, p_window, p_draws, p_step, policy_critic, p_normalizer,
            policy_mailbox, critic_mailbox, normalizer_mailbox, actor, p_device, args)),
    ]
    stop_signals_end_the_loop()  # from the learners' start on, a stop signal is recorded, and the actor's loop ends the run
    for thread in threads:
        thread.start()

    global_step, mean_return, policy_version = 0, float("nan"), -1
    last_log = {"iterations": args.warmup_iterations, "v_updates": 0, "p_updates": 0}
    last_sums = {}
    start_time = last_save_time = time.time()
    progress = progress_bar(args.total_timesteps)
    exit_code, iteration, error = 0, 0, None
    out_of_budget = False  # set by the iteration that reaches --total-timesteps or --max-time, or by Ctrl-C or SIGTERM
    try:
        with role_streams(actor_device, v_device, keep_default_stream=True):  # the envs' stream, as in pql.py
            obs = env.reset()
            eval_obs = eval_env.reset() if eval_env is not None else None
            while not out_of_budget:
                if not coordinator.wait_until(coordinator.actor_may_step, deadline=start_time + args.max_time):
                    break  # a learner failed (its exception is re-raised below), or the time ran out waiting
                # ---- actor: one step of all envs ----
                if iteration < args.warmup_iterations:
                    actions = torch.rand(args.num_envs, env.act_dim, device=actor_device) * 2 - 1
                else:
                    policy_version = policy_mailbox.fetch("actor", acting_policy, policy_version)
                    actions = explore(acting_policy, obs_normalizer, obs, noise_stds)
                next_obs, rewards, terminated, truncated, info = env.step(actions)
                if args.timeouts_as_terminal:
                    terminated = terminated | truncated
                shared_replay.add(obs, actions, rewards * reward_scale, info["final_obs"], terminated, truncated, info["valid"])
                # The statistics count what the policy acts on after each step: next_obs, a new episode's start
                # where one ended; not an ended episode's true last observation (final_obs, only bootstrapped
                # from), and not the first reset's observations (one batch).
                obs_normalizer.update(next_obs)
                obs = next_obs
                global_step += args.num_envs
                ended = (terminated | truncated).double()
                actor_stats["return_sum"] += (info["episode_return"] * ended).sum()
                actor_stats["length_sum"] += (info["episode_length"] * ended).sum()
                actor_stats["episodes"] += ended.sum()
                if eval_env is not None:  # the same policy without noise, on envs of its own
                    eval_obs = evaluation_step(eval_env, eval_obs, acting_policy, obs_normalizer, actor_stats)
                # The true last observation of an episode that ended goes into the buffer too: a physics
                # blow-up that ends an episode shows there, not in next_obs (the next episode's start).
                finite = torch.isfinite(next_obs).all() & torch.isfinite(info["final_obs"]).all() & torch.isfinite(rewards).all()
                first_nonfinite_iteration = torch.where(finite, first_nonfinite_iteration, first_nonfinite_iteration.clamp(max=iteration))
                iteration += 1
                coordinator.count("iterations")
                if iteration % args.sync_interval == 0:
                    normalizer_mailbox.publish({"obs_normalizer": obs_normalizer})
                progress.update(args.num_envs)
                out_of_budget = global_step >= args.total_timesteps or time.time() - start_time >= args.max_time or STOP_SIGNAL is not None

                # ---- logging and checkpoints: the only host syncs of the actor's loop; every
                # --log-interval iterations, and after the last one, so that the logs reach the run's end ----
                if iteration % args.log_interval == 0 or out_of_budget:
                    bad_iteration = first_nonfinite_iteration.item()
                    # One read of every running sum, checked and then logged as read: the learners go
                    # on writing meanwhile, so a loss read again after the check could be one it missed.
                    sums = read_sums(actor_stats, v_stats, p_stats)
                    nonfinite_losses = sums["critic_nonfinite"] + sums["actor_nonfinite"] > 0
                    nonfinite_sums = [name for name, value in sums.items() if not math.isfinite(value)]  # e.g. an evaluation env's return
                    if bad_iteration != float("inf") or nonfinite_losses or nonfinite_sums:
                        if bad_iteration != float("inf"):
                            bad_step = (int(bad_iteration) + 1) * args.num_envs
                            where = f"observation or reward at env step {bad_step} (iteration {int(bad_iteration)})"
                        elif nonfinite_losses:
                            where = f"loss before env step {global_step}"
                        else:
                            where = f"statistic ({', '.join(nonfinite_sums)}) before env step {global_step}"
                        print(f"error: non-finite {where}; stopping, the last good checkpoint is {checkpoint_path}", file=sys.stderr)
                        exit_code = 1
                        break
                    mean_return, last_log, last_sums = log_progress(
                        writer, coordinator, sums, last_log, last_sums, global_step, time.time() - start_time, mean_return, progress, args)
                    if time.time() - last_save_time > args.save_interval and not out_of_budget:  # the end saves below
                        if not save_published_checkpoint(checkpoint_path, policy_mailbox, critic_mailbox, obs_normalizer, args, global_step):
                            print(f"error: non-finite weights at env step {global_step}; stopping, the last good checkpoint is"
                                  f" {checkpoint_path}", file=sys.stderr)
                            exit_code = 1
                            break
                        last_save_time = time.time()
            if not out_of_budget and exit_code == 0 and coordinator.error is None:
                # The loop ended while the actor waited for the learners (the time ran out, or Ctrl-C
                # or SIGTERM came): the iterations since the last log are logged all the same.
                mean_return, last_log, last_sums = log_progress(
                    writer, coordinator, read_sums(actor_stats, v_stats, p_stats), last_log, last_sums, global_step,
                    time.time() - start_time, mean_return, progress, args)
    except BaseException as main_error:  # noqa: B036 -- stop the learners, save, then re-raise
        error = main_error
    if STOP_SIGNAL is not None and exit_code != 1:  # after a non-finite value, exit 1 all the same
        exit_code = 128 + STOP_SIGNAL  # the shell's convention: 130 after Ctrl-C, 143 after SIGTERM
        print(f"\ninterrupted at env step {global_step} ({STOP_SIGNAL.name}); saving {checkpoint_path}", file=sys.stderr)
    # ---- shutdown: stop every role, wait (never forever), flush, re-raise a thread's exception ----
    stopping()  # a Ctrl-C from here on cannot cut the final save short
    coordinator.stop()
    join_deadline = time.time() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(timeout=max(0.0, join_deadline - time.time()))  # each role checks the stop flag between updates
    error = error or coordinator.error
    progress.close()
    stuck = [thread.name for thread in threads if thread.is_alive()]
    if stuck:
        print(f"error: the {' and the '.join(stuck)} did not stop within {JOIN_TIMEOUT:.0f} s of the stop signal;"
              f" exiting without a final checkpoint (the last one is {checkpoint_path})", file=sys.stderr)
        exit_code = 1
    elif exit_code != 1:  # after a non-finite value, keep the last good checkpoint instead
        try:
            for device in set(devices):  # the learners' streams too, before reading their losses and weights
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            # The learners may have made a loss non-finite after the last log: look once more.
            nonfinite_updates = v_stats["critic_nonfinite"].item() + p_stats["actor_nonfinite"].item()
            if first_nonfinite_iteration.item() == float("inf") and nonfinite_updates == 0 and save_checkpoint(
                    checkpoint_path, actor, critic, critic_target, obs_normalizer, args, global_step):
                print(f"saved {checkpoint_path} after {global_step} env steps; latest mean return {mean_return:.2f}")
            else:
                print("error: non-finite values (observations, rewards, losses or weights) at the end; checkpoint not updated", file=sys.stderr)
                exit_code = 1
        except Exception:  # after a CUDA error in a role the device may refuse all work: re-raise that error below
            if error is None:
                raise
    writer.close()
    if stuck:  # a thread blocked inside a CUDA call can hang the interpreter's exit: leave at once
        if error is not None:
            traceback.print_exception(type(error), error, error.__traceback__)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    if error is not None:
        raise error
    return exit_code


def read_sums(*stats_dicts):
    """The roles' running sums, copied to the host (a sync with each role's device)."""
    return {name: value.item() for stats in stats_dicts for name, value in stats.items()}


def log_progress(writer, coordinator, sums, last_log, last_sums, global_step, elapsed, mean_return, progress, args):
    """Turn the roles' running sums (read from the device) into sums over the last interval, write
    them with the achieved ratios, and return the new reference points."""
    with coordinator.lock:
        counts = {"iterations": coordinator.iterations, "v_updates": coordinator.v_updates, "p_updates": coordinator.p_updates}
    values = {name: value - last_sums.get(name, 0.0) for name, value in sums.items()}
    values["v_updates"] = counts["v_updates"] - last_log["v_updates"]
    values["p_updates"] = counts["p_updates"] - last_log["p_updates"]
    mean_return = write_scalars(writer, values, global_step, counts["v_updates"], elapsed, mean_return, progress, args)
    learning_iterations = counts["iterations"] - max(last_log["iterations"], args.warmup_iterations)
    if learning_iterations > 0:
        writer.add_scalar("charts/v_updates_per_env_step", values["v_updates"] / learning_iterations, global_step)
    if values["p_updates"] > 0:
        writer.add_scalar("charts/v_updates_per_p_update", values["v_updates"] / values["p_updates"], global_step)
    return mean_return, counts, sums


def save_published_checkpoint(path, policy_mailbox, critic_mailbox, obs_normalizer, args, global_step):
    """A checkpoint while the learners train: from the published snapshots, under their locks,
    so it never mixes half-updated weights. Returns False (and writes nothing) if they are not finite."""
    with policy_mailbox.lock, critic_mailbox.lock:
        policy_mailbox.order_after_publish()
        critic_mailbox.order_after_publish()
        # save_checkpoint copies to the host, which waits for those copies: done before the locks go.
        return save_checkpoint(path, policy_mailbox.snapshots["actor"], critic_mailbox.snapshots["critic"],
                               critic_mailbox.snapshots["critic_target"], obs_normalizer, args, global_step)


def resolve_role_devices(args, device):
    """The actor's, the V-learner's and the P-learner's devices, each with an index on CUDA; a
    role flag left out means --device."""
    flags = [("--actor-device", args.actor_device), ("--v-learner-device", args.v_learner_device),
             ("--p-learner-device", args.p_learner_device)]
    return tuple(device if name is None else resolve_device(name, flag) for flag, name in flags)


def set_up_and_run(args):
    """Check the input, build the envs, then train (or evaluate a checkpoint); returns the exit code."""
    # Everything that can be wrong with the input is checked here, before any work starts.
    try:
        validate_args(args)
        device = resolve_device(args.device)
        if args.eval_checkpoint is not None:
            if not os.path.isfile(args.eval_checkpoint):
                raise ValueError(f"--eval-checkpoint {args.eval_checkpoint}: no such file")
        else:
            if args.sync_interval < 1:
                raise ValueError(f"--sync-interval must be >= 1, got {args.sync_interval}")
            devices = resolve_role_devices(args, device)
            for role_device in devices:
                if args.bf16 and role_device.type == "cuda" and torch.cuda.get_device_capability(role_device) < (8, 0):
                    raise ValueError(f"--bf16 needs bfloat16 tensor cores (a GPU of compute capability 8.0, Ampere, or newer);"
                                     f" {role_device} has {torch.cuda.get_device_capability(role_device)}")
            torch.backends.cuda.matmul.allow_tf32 = args.tf32
            random.seed(args.seed)
            np.random.seed(args.seed)
            torch.manual_seed(args.seed)
            env = envs.make_env(args.task, args.num_envs, device=devices[0], seed=args.seed)
            eval_env = make_eval_env(args, devices[0])
            capacity = args.buffer_size // args.num_envs
            if capacity <= overwrite_guard(args):
                raise ValueError(f"--buffer-size ({args.buffer_size}) must hold more than {overwrite_guard(args)} rows per env"
                                 f" (the rows the actor may be overwriting), i.e. > {overwrite_guard(args) * args.num_envs}")
            check_buffer_fits(ReplayBuffer.bytes_needed(args.num_envs, capacity, env.obs_dim, env.act_dim), devices[1])
            note_if_sized_for_a_gpu(args, devices[0])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.eval_checkpoint is not None:
        evaluate(args.eval_checkpoint, args.eval_episodes, device, args.seed)
        return 0
    # The roles hand Python's GIL to each other around every torch call; a thread that wants it back
    # while another runs Python waits up to the switch interval. A tenth of Python's default ran this
    # script 3-7% faster on the GPU, at toy sizes on the CPU and on mjlab in pairs on the CPU; on the
    # CPU quick start, and in an unpaired mjlab rerun, no clear difference; never clearly slower (docs/gpu.md).
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        return train(args, env, eval_env, devices)
    finally:
        sys.setswitchinterval(switch_interval)


def main():
    args = parse_args()
    catch_stop_signals()
    try:
        return set_up_and_run(args)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM before the training loop (which only records them)
        name, exit_code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("SIGINT", 130)
        print(f"\ninterrupted ({name}) before training started: no checkpoint written", file=sys.stderr)
        return exit_code


if __name__ == "__main__":
    exit_ignoring_stop_signals(main())
