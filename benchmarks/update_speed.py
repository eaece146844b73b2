"""How fast are PQL's learner updates, and how far are they from the machine's arithmetic limit?

For each size (the README's CPU quick start, and the scripts' defaults) this builds pql.py's
networks for Pendulum, fills a replay buffer with random transitions, and times the learners' share
of one iteration of pql.py (8 V-updates and 4 P-updates, each with its sampling) for each code
path, side by side in one process, in turns, so that a slow patch of the machine hits all paths:

    plain     pql.py as it is: AdamW with torch's default implementation (a loop over tensors on the CPU)
    foreach   AdamW(foreach=True): one multi-tensor op per step instead of one per tensor
    fused     AdamW(fused=True): one fused kernel (on the CPU from torch 2.4)
    compile   torch.compile of the two update functions (its compile time is printed apart)

Beside each figure: the arithmetic limit, the FLOPs of the updates' matrix products (counted layer
by layer) over the matmul throughput of this machine (a large float32 matmul, measured here), so
the gap between what the updates do and what they could do shows.

    python benchmarks/update_speed.py                       # quick start and default sizes, CPU
    python benchmarks/update_speed.py --device cuda         # on a GPU
    python benchmarks/update_speed.py --paths plain fused compile
"""
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Tuple

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pql  # noqa: E402
from bench_envs import machine_name  # noqa: E402

SIZES = {  # name: (hidden dims, batch size), as in the README's quick start and the scripts' defaults
    "quick-start": ((64, 64), 1024),
    "default": ((512, 256, 128), 8192),
}
OBS_DIM, ACT_DIM = 3, 1  # Pendulum
V_UPDATES, P_UPDATES = 8, 4  # one iteration of pql.py at its default ratios


@dataclass
class Args:
    sizes: Tuple[str, ...] = ("quick-start", "default")
    """network and batch sizes to time: quick-start (64-64, batch 1024) and default (512-256-128, batch 8192)"""
    paths: Tuple[str, ...] = ("plain", "foreach", "fused")
    """code paths to time: plain, foreach, fused, compile"""
    device: str = "cpu"
    """device of the networks and the buffer"""
    seconds: float = 10.0
    """seconds of timed iterations per path and size (after warm-up), split into 5 turns"""
    seed: int = 0
    """seed of the networks and the random transitions"""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device, size=2048, seconds=2.0):
    """Throughput of a large float32 matmul: the most this machine's arithmetic gives."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def mlp_flops(in_dim, hidden_dims, out_dim, batch):
    """Multiply-adds x 2 of one forward pass of pql.mlp through its matrix products."""
    dims = [in_dim, *hidden_dims, out_dim]
    return sum(2 * batch * d_in * d_out for d_in, d_out in zip(dims[:-1], dims[1:]))


def update_flops(hidden_dims, batch):
    """FLOPs of the matrix products of one V-update and one P-update. A backward pass costs two
    forward passes (gradients of inputs and of weights), one where only input gradients are needed
    (the P-learner's frozen critic copy)."""
    actor = mlp_flops(OBS_DIM, hidden_dims, ACT_DIM, batch)
    q_head = mlp_flops(OBS_DIM + ACT_DIM, hidden_dims, 1, batch)
    v_update = actor + 2 * q_head + 2 * q_head * 3  # target actions, target critic, critic forward + backward
    p_update = actor * 3 + 2 * q_head * 2  # actor forward + backward, critic forward + input gradients
    return v_update, p_update


class Learners:
    """pql.py's learner state for one size and one code path."""

    def __init__(self, path, hidden_dims, batch_size, device, seed):
        torch.manual_seed(seed)
        self.args = pql.Args(hidden_dims=hidden_dims, batch_size=batch_size)
        self.buffer = pql.ReplayBuffer(64, 1000, OBS_DIM, ACT_DIM, device)
        for _ in range(1000):
            self.buffer.add(torch.randn(64, OBS_DIM, device=device), torch.rand(64, ACT_DIM, device=device) * 2 - 1,
                            -torch.rand(64, device=device), torch.randn(64, OBS_DIM, device=device),
                            torch.zeros(64, dtype=torch.bool, device=device), torch.rand(64, device=device) < 0.005,
                            torch.ones(64, dtype=torch.bool, device=device))
        self.normalizer = pql.ObsNormalizer(OBS_DIM, 5.0, device)
        self.normalizer.update(self.buffer.obs[:, :1000].reshape(-1, OBS_DIM))
        self.actor = pql.Actor(OBS_DIM, ACT_DIM, hidden_dims).to(device)
        self.critic = pql.make_critic(OBS_DIM, ACT_DIM, self.args).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_policy = copy.deepcopy(self.actor).requires_grad_(False)
        self.policy_critic = copy.deepcopy(self.critic).requires_grad_(False)
        options = {"plain": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "compile": {}}[path]
        self.actor_optimizer = torch.optim.AdamW(self.actor.parameters(), lr=self.args.actor_lr, **options)
        self.critic_optimizer = torch.optim.AdamW(self.critic.parameters(), lr=self.args.critic_lr, **options)
        self.update_critic, self.update_actor = pql.update_critic, pql.update_actor
        if path == "compile":
            self.update_critic, self.update_actor = torch.compile(pql.update_critic), torch.compile(pql.update_actor)

    def iteration(self):
        """The learners' share of one iteration of pql.py: 8 V-updates, 4 P-updates, hand-off."""
        args = self.args
        for v_update in range(1, V_UPDATES + 1):
            batch = self.buffer.sample(args.batch_size, args.nstep, args.gamma)
            self.update_critic(self.critic, self.critic_target, self.critic_optimizer, self.target_policy, self.normalizer, batch, args)
            if v_update % args.v_updates_per_p_update == 0:
                obs = self.buffer.sample_obs(args.batch_size)
                self.update_actor(self.actor, self.actor_optimizer, self.policy_critic, self.normalizer, obs, args)
        pql.copy_weights(self.actor, self.target_policy)
        pql.copy_weights(self.critic, self.policy_critic)


def rate(per_second):
    """Three significant digits, without an exponent: 1,234 and 92.1 and 1.87."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def main():
    args = tyro.cli(Args)
    unknown = [p for p in args.paths if p not in ("plain", "foreach", "fused", "compile")]
    if unknown or not args.paths or any(s not in SIZES for s in args.sizes) or not args.sizes or args.seconds <= 0:
        print(f"error: --paths must be among plain, foreach, fused, compile (got {list(args.paths)}), --sizes among"
              f" {', '.join(SIZES)} (got {list(args.sizes)}), --seconds > 0", file=sys.stderr)
        return 2
    device = pql.resolve_device(args.device)
    peak = matmul_flops_per_second(device)
    print(f"update_speed.py on {machine_name(device)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; matmul throughput {peak / 1e9:.1f} GFLOP/s (float32)\n")
    print("| size | path | V-updates/s | P-updates/s | iteration (8 V + 4 P) ms | arithmetic limit, iteration ms | x limit |"
          " speed-up over plain |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        hidden_dims, batch_size = SIZES[size]
        v_flops, p_flops = update_flops(hidden_dims, batch_size)
        limit = (V_UPDATES * v_flops + P_UPDATES * p_flops) / peak
        paths = {}
        for path in args.paths:
            try:
                learners = Learners(path, hidden_dims, batch_size, device, args.seed)
                start = time.perf_counter()
                for _ in range(2):  # warm-up; for compile, the compilation
                    learners.iteration()
                synchronize(device)
                if path == "compile":
                    print(f"# {size}: compiling and two warm-up iterations took {time.perf_counter() - start:.1f} s")
                paths[path] = learners
            except (RuntimeError, TypeError, ValueError) as error:  # e.g. fused AdamW on a CPU before torch 2.4
                print(f"# {size}: path {path} unavailable here: {str(error).splitlines()[0]}")
        elapsed = {path: 0.0 for path in paths}
        iterations = {path: 0 for path in paths}
        for _ in range(5):  # in turns, so that a slow patch of the machine hits every path
            for path, learners in paths.items():
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds / 5 or iterations[path] == 0:
                    learners.iteration()
                    synchronize(device)
                    iterations[path] += 1
                elapsed[path] += time.perf_counter() - start
        for path in paths:
            iteration_s = elapsed[path] / iterations[path]
            speed_up = f"{elapsed['plain'] / iterations['plain'] / iteration_s:.2f}x" if "plain" in paths else "-"
            print(f"| {size} | {path} | {rate(V_UPDATES / iteration_s)} | {rate(P_UPDATES / iteration_s)} | {1000 * iteration_s:.1f} |"
                  f" {1000 * limit:.2f} | {iteration_s / limit:.0f} | {speed_up} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
