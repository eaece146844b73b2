"""What does a Pendulum policy do, and what does its critic believe? For runs stuck near -800.

Loads Pendulum checkpoints (model.pt of pql.py or pql_threaded.py), runs each deterministic policy
from the same random starts (Gymnasium's start distribution), and prints per checkpoint:

  * behaviour over the second half of the 200-step episode: how many episodes end balanced
    (|angle| < 0.3 rad for the last 50 steps), spinning (at least one full turn in the last 100
    steps) or neither ("stuck"); the mean |angle| and |angular velocity|;
  * the actions: mean |action|, the share at the torque limit (|a| > 0.99), and how far the
    policy's output before its tanh goes (past ~3 the tanh is flat and passes almost no gradient);
  * for the stuck episodes: where they hang, whether the critic's slope dQ/da at the policy's
    action asks for more of the same torque, and whether the critic's best action over a grid
    has the opposite sign: Q(s, a) is the return of taking a once and then following the policy,
    so a higher Q at the opposite action is an improvement the policy could make in that state
    (the policy improvement step) and its gradient ascent does not find;
  * the critic: its Q (the smaller head, as the policy is trained) at the start states against the
    true discounted return, computed by running the policy on past the episode end (the critic
    bootstraps through time limits, so it estimates the unending return), in the critic's units.

    python benchmarks/diagnose_pendulum.py runs/<stuck run>/model.pt runs/<solved run>/model.pt
"""
import math
import os
import sys
from dataclasses import dataclass
from typing import Tuple

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402
import pql  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[Tuple[str, ...]]
    """model.pt files of Pendulum runs"""
    starts: int = 64
    """episodes per checkpoint, from the same random starts for every checkpoint"""
    seed: int = 12345
    """seed of the starts"""
    horizon: int = 800
    """steps simulated past the start; the discounted return of step t < 200 sums rewards up to here"""


def load(path):
    checkpoint = torch.load(path, map_location="cpu")
    trained = pql.Args(**{k: tuple(v) if k == "hidden_dims" else v for k, v in checkpoint["args"].items() if k in pql.Args.__dataclass_fields__})
    if trained.task != "Pendulum":
        raise SystemExit(f"error: {path} is a {trained.task} checkpoint; this script reads Pendulum ones")
    env = envs.make_env("Pendulum", 1, device="cpu", seed=0)
    actor = pql.Actor(env.obs_dim, env.act_dim, trained.hidden_dims)
    actor.load_state_dict(checkpoint["actor"])
    critic = pql.make_critic(env.obs_dim, env.act_dim, trained)
    critic.load_state_dict(checkpoint["critic"])
    normalizer = pql.ObsNormalizer(env.obs_dim, trained.obs_clip, "cpu")
    normalizer.load_state_dict(checkpoint["obs_normalizer"])
    reward_scale = trained.reward_scale if trained.reward_scale is not None else pql.TASK_DEFAULTS["Pendulum"]["reward_scale"]
    return {"name": path, "actor": actor, "critic": critic, "normalizer": normalizer, "reward_scale": reward_scale,
            "gamma": trained.gamma}


@torch.no_grad()
def rollout(run, args):
    """The deterministic policy from the shared starts, `horizon` steps without a time limit."""
    env = envs.make_env("Pendulum", args.starts, device="cpu", seed=args.seed)
    env.reset()
    state = env.state
    obs_list, action_list, pre_tanh_list, reward_list, angle_list, velocity_list = [], [], [], [], [], []
    for _ in range(args.horizon):
        obs = env.observe(state).t()
        pre_tanh = run["actor"].net(run["normalizer"].normalize(obs))
        action = torch.tanh(pre_tanh)
        angle_list.append(state[0].clone())
        velocity_list.append(state[1].clone())
        state, _, reward = env.dynamics(state, action.t())
        obs_list.append(obs)
        action_list.append(action)
        pre_tanh_list.append(pre_tanh)
        reward_list.append(reward)
    rewards = torch.stack(reward_list)  # (horizon, starts)
    discounted = torch.zeros_like(rewards)
    running = torch.zeros(args.starts)
    for t in reversed(range(args.horizon)):
        running = rewards[t] + run["gamma"] * running
        discounted[t] = running
    return {"obs": torch.stack(obs_list), "actions": torch.stack(action_list), "pre_tanh": torch.stack(pre_tanh_list),
            "rewards": rewards, "discounted": discounted, "angle": torch.stack(angle_list), "velocity": torch.stack(velocity_list)}


def critic_values(run, path, steps):
    """The critic's min-head Q and dQ/da on the first `steps` states and actions of a trajectory."""
    obs = run["normalizer"].normalize(path["obs"][:steps].reshape(-1, path["obs"].shape[-1]))
    actions = path["actions"][:steps].reshape(-1, path["actions"].shape[-1]).clone().requires_grad_(True)
    q1, q2 = run["critic"](obs, actions)
    q = torch.min(q1, q2)
    (slope,) = torch.autograd.grad(q.sum(), actions)
    return q.detach().reshape(steps, -1), slope.reshape(steps, -1)


def describe(run, path, episode_steps=200):
    angle = envs.angle_normalize(path["angle"][:episode_steps])
    velocity = path["velocity"][:episode_steps]
    balanced = (angle[-50:].abs() < 0.3).all(0)
    turns = (path["angle"][episode_steps - 1] - path["angle"][episode_steps // 2]).abs() / (2 * math.pi)
    spinning = (turns >= 1.0) & ~balanced
    actions = path["actions"][:episode_steps]
    late_actions = actions[episode_steps // 2:]
    q, slope = critic_values(run, path, episode_steps)
    true_value = path["discounted"][:episode_steps] * run["reward_scale"]
    saturated = late_actions.abs().squeeze(-1) > 0.99
    late_slope = slope[episode_steps // 2:]
    # At the torque limit, does the critic ask for more of the same torque (a local optimum of the
    # policy) or for less (then only the saturated tanh keeps the policy there)?
    outward = (late_slope * late_actions.squeeze(-1).sign() > 0) & saturated
    # The same question for the episodes that end neither balanced nor spinning (stuck ones).
    stuck = ~balanced & ~spinning
    stuck_saturated = saturated & stuck[None, :]
    stuck_outward = outward & stuck[None, :]
    # Is the policy's action at the top of the critic over all actions, or does the critic rate
    # an action of the opposite sign higher (a local optimum of the policy's gradient ascent)?
    grid = torch.linspace(-1.0, 1.0, 41)
    late_obs = path["obs"][episode_steps // 2:episode_steps][:, stuck].reshape(-1, path["obs"].shape[-1])
    opposite_better = float("nan")
    if late_obs.shape[0]:
        with torch.no_grad():
            normalized = run["normalizer"].normalize(late_obs)
            q_grid = torch.stack([torch.min(*run["critic"](normalized, torch.full((late_obs.shape[0], 1), float(a)))) for a in grid], 1)
        best_action = grid[q_grid.argmax(1)]
        policy_action = late_actions[:, stuck].reshape(-1)
        opposite_better = (best_action * policy_action < 0).float().mean().item()
    return {
        "stuck opposite better": opposite_better,
        "stuck": int(stuck.sum()),
        "stuck |angle|": angle[episode_steps // 2:, stuck].abs().mean().item() if stuck.any() else float("nan"),
        "stuck |velocity|": velocity[episode_steps // 2:, stuck].abs().mean().item() if stuck.any() else float("nan"),
        "stuck at limit": stuck_saturated.sum().item() / max(1, int(stuck.sum()) * late_actions.shape[0]),
        "stuck limit, critic wants more": (stuck_outward.sum() / stuck_saturated.sum().clamp(min=1)).item(),
        "stuck start |angle|": angle[0, stuck].abs().mean().item() if stuck.any() else float("nan"),
        "other start |angle|": angle[0, ~stuck].abs().mean().item() if (~stuck).any() else float("nan"),
        "return": path["rewards"][:episode_steps].sum(0).mean().item(),
        "balanced": int(balanced.sum()), "spinning": int(spinning.sum()), "episodes": angle.shape[1],
        "late |angle|": angle[episode_steps // 2:].abs().mean().item(),
        "late |velocity|": velocity[episode_steps // 2:].abs().mean().item(),
        "late |action|": late_actions.abs().mean().item(),
        "late at limit": saturated.float().mean().item(),
        "late limit, critic wants more": (outward.sum() / saturated.sum().clamp(min=1)).item(),
        "pre-tanh > 3": (path["pre_tanh"][:episode_steps].abs() > 3).float().mean().item(),
        "pre-tanh q90": path["pre_tanh"][:episode_steps].abs().quantile(0.9).item(),
        "Q": q[0].mean().item(), "true": true_value[0].mean().item(),
        "Q error": (q - true_value).abs().mean().item(),
    }


def main():
    args = tyro.cli(Args)
    runs = [load(path) for path in args.checkpoints]
    paths = [rollout(run, args) for run in runs]
    print(f"Deterministic policies from {args.starts} random starts (seed {args.seed}); 'late' = steps 100-199 of the episode;"
          f" Q and true: discounted returns in the critic's units (rewards x reward scale)\n")
    for index, (run, path) in enumerate(zip(runs, paths)):
        summary = describe(run, path)
        print(f"[{index}] {run['name']}")
        print(f"    return {summary['return']:.1f}; episodes balanced {summary['balanced']}/{summary['episodes']},"
              f" spinning {summary['spinning']}/{summary['episodes']}; late |angle| {summary['late |angle|']:.2f} rad,"
              f" |velocity| {summary['late |velocity|']:.2f} rad/s")
        print(f"    actions: late |a| {summary['late |action|']:.2f}, {100 * summary['late at limit']:.0f}% at the limit"
              f" (of those, the critic asks for more in {100 * summary['late limit, critic wants more']:.0f}%);"
              f" |pre-tanh| > 3 in {100 * summary['pre-tanh > 3']:.0f}% of steps (90th percentile {summary['pre-tanh q90']:.1f})")
        if summary["stuck"]:
            print(f"    the {summary['stuck']} other episodes: late |angle| {summary['stuck |angle|']:.2f} rad, |velocity|"
                  f" {summary['stuck |velocity|']:.2f} rad/s, {100 * summary['stuck at limit']:.0f}% of actions at the limit (the critic"
                  f" asks for more in {100 * summary['stuck limit, critic wants more']:.0f}%); start |angle| {summary['stuck start |angle|']:.2f}"
                  f" rad (other episodes: {summary['other start |angle|']:.2f}); the critic's best action has the opposite sign"
                  f" in {100 * summary['stuck opposite better']:.0f}% of their late steps")
        print(f"    critic on its own policy: at the starts Q {summary['Q']:.2f}, true {summary['true']:.2f}; mean |Q - true| over the"
              f" episode {summary['Q error']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
