"""Reference scores for the built-in tasks: a uniform random policy and a hand-made
(scripted) controller per task, each as the mean undiscounted return over many episodes.
They bracket what a learner should reach: above random means it learned something, near
the scripted controller means it learned the task.

    python benchmarks/score_envs.py                 # 100 episodes per task and policy
    python benchmarks/score_envs.py --episodes 10

The controllers read only the observation, as a learned policy would:
- Pendulum: pump energy towards the upright energy (u ~ -E * theta_dot), then a PD
  balance controller near the top.
- CartpoleSwingup: the same energy pumping through the cart's acceleration, then an LQR
  balance controller (gains from the linearised cart-pole, discrete Riccati iteration).
- Reacher: inverse kinematics for the joint angles that put the tip on the target (the
  elbow side needing less travel), then joint-space PD. (Jacobian-transpose control
  scored worse: the arm starts stretched out, where the Jacobian is nearly singular and
  pulls the tip inwards only slowly.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402


def random_policy(env, generator: torch.Generator):
    def act(obs):
        return torch.rand(env.num_envs, env.act_dim, generator=generator, device="cpu").to(obs.device) * 2 - 1

    return act


def pendulum_controller(env):
    """theta_ddot = 15 sin(theta) + 3 u (u the torque), so E = theta_dot^2 / 2 + 15 (cos theta - 1)
    is 0 upright at rest and dE/dt = 3 u theta_dot: u = -k E theta_dot pumps E towards 0."""

    def act(obs):
        cos, sin, thdot = obs.unbind(1)
        th = torch.atan2(sin, cos)
        energy = 0.5 * thdot**2 + 15.0 * (cos - 1.0)
        pump = (-0.5 * energy * thdot).clamp(-2.0, 2.0)
        balance = -(10.0 * th + 2.0 * thdot)
        torque = torch.where(cos > math.cos(0.6), balance, pump)
        return (torque / env.max_torque)[:, None].clamp(-1, 1)

    return act


def cartpole_lqr_gain(env) -> np.ndarray:
    """LQR gain for the cart-pole linearised upright, state (x, theta, x_dot, theta_dot),
    input u in [-1, 1] (force = max_force * u)."""
    mc, mp, l, g = env.cart_mass, env.pole_mass, env.half_length, env.gravity
    total = mc + mp
    denom = l * (4.0 / 3.0 - mp / total)
    # theta_acc = (g theta - F / total) / denom;  x_acc = F / total - mp l theta_acc / total
    a = np.zeros((4, 4))
    b = np.zeros((4, 1))
    a[0, 2] = a[1, 3] = 1.0
    a[3, 1] = g / denom
    a[2, 1] = -mp * l * a[3, 1] / total
    b[3, 0] = -env.max_force / total / denom
    b[2, 0] = env.max_force / total - mp * l * b[3, 0] / total
    ad, bd = np.eye(4) + env.dt * a, env.dt * b
    q, r = np.diag([1.0, 1.0, 0.1, 0.1]), np.array([[1.0]])
    p = q.copy()
    for _ in range(5000):  # discrete Riccati iteration to convergence
        k = np.linalg.solve(r + bd.T @ p @ bd, bd.T @ p @ ad)
        p = q + ad.T @ p @ (ad - bd @ k)
    return k[0]


def cartpole_controller(env):
    """Swing-up by energy pumping through the cart's acceleration, LQR near upright.
    Pole energy about the pivot: E = I theta_dot^2 / 2 + mp g l (cos theta - 1), 0 upright.
    With the cart accelerating at a, dE/dt = -mp l a cos(theta) theta_dot, so
    a = k E cos(theta) theta_dot raises E while E < 0."""
    k = torch.tensor(cartpole_lqr_gain(env), dtype=torch.float32)
    mp, l, g = env.pole_mass, env.half_length, env.gravity
    inertia = mp * (2 * l) ** 2 / 3
    total = env.cart_mass + mp

    def act(obs):
        x, cos, sin, xd, thd = obs.unbind(1)
        th = torch.atan2(sin, cos)
        energy = 0.5 * inertia * thd**2 + mp * g * l * (cos - 1.0)
        accel = 40.0 * energy * cos * thd - 8.0 * x - 5.0 * xd  # pump, and keep the cart near 0
        swing = (total * accel / env.max_force).clamp(-1, 1)
        state = torch.stack([x, th, xd, thd], dim=1)
        balance = -(state @ k.to(obs.device))
        u = torch.where(cos > math.cos(0.8), balance, swing)
        return u[:, None].clamp(-1, 1)

    return act


def wrap(angle: torch.Tensor) -> torch.Tensor:
    return torch.remainder(angle + math.pi, 2 * math.pi) - math.pi


def reacher_controller(env):
    """Joint-space PD towards the inverse-kinematics solution for the target."""
    l1, l2 = env.l1, env.l2

    def act(obs):
        c1, c2, s1, s2 = obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 3]
        q = torch.stack([torch.atan2(s1, c1), torch.atan2(s2, c2)], dim=1)
        qd, tx, ty = obs[:, 6:8], obs[:, 4], obs[:, 5]
        # Law of cosines: |target|^2 = l1^2 + l2^2 + 2 l1 l2 cos q2; two elbow solutions.
        cos_q2 = ((tx * tx + ty * ty - l1 * l1 - l2 * l2) / (2 * l1 * l2)).clamp(-1, 1)
        errors = []
        for elbow in (1.0, -1.0):
            q2 = elbow * torch.acos(cos_q2)
            q1 = torch.atan2(ty, tx) - torch.atan2(l2 * q2.sin(), l1 + l2 * q2.cos())
            errors.append(torch.stack([wrap(q1 - q[:, 0]), q2 - q[:, 1]], dim=1))
        near = errors[0].abs().sum(1, keepdim=True) <= errors[1].abs().sum(1, keepdim=True)
        err = torch.where(near, errors[0], errors[1])
        tau = 2.0 * err - 0.2 * qd
        return (tau / env.max_torque).clamp(-1, 1)

    return act


CONTROLLERS = {"Pendulum": pendulum_controller, "CartpoleSwingup": cartpole_controller, "Reacher": reacher_controller}


def evaluate(task: str, policy: str, episodes: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Returns of `episodes` episodes, one per env, all run side by side."""
    env = envs.make_env(task, episodes, device=device, seed=seed)
    if policy == "random":
        act = random_policy(env, torch.Generator().manual_seed(seed))
    else:
        act = CONTROLLERS[task](env)
    obs = env.reset()
    for _ in range(env.max_episode_length):
        obs, _, _, truncated, info = env.step(act(obs))
    assert bool(truncated.all()), "built-in episodes all end together at max_episode_length"
    return info["episode_return"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", nargs="+", default=envs.list_tasks())
    args = parser.parse_args()
    print(f"mean +- std of the undiscounted return over {args.episodes} episodes (seed {args.seed})")
    print(f"| task | episode length | random policy | scripted controller |")
    print(f"|---|---|---|---|")
    for task in args.tasks:
        rand = evaluate(task, "random", args.episodes, args.seed, args.device)
        good = evaluate(task, "scripted", args.episodes, args.seed, args.device)
        print(f"| {task} | {envs.TASKS[task].max_episode_length} | {rand.mean():.1f} +- {rand.std():.1f} "
              f"| {good.mean():.1f} +- {good.std():.1f} |", flush=True)


if __name__ == "__main__":
    main()
