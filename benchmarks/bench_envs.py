"""Speed of the built-in tasks next to the policy network that acts on them.

For each task and batch size, prints the time of one env.step() for all envs, the env
steps per second, the time of one forward pass of the default policy network
(MLP obs -> 512 -> 256 -> 128 -> act, ELU, tanh output) on the same batch, and their
ratio. The goal: at 4096 envs one env step costs <= 5% of that forward pass, so
simulation is never what a PQL actor waits on.

    python benchmarks/bench_envs.py                       # CPU, 256 / 4096 / 65536 envs
    python benchmarks/bench_envs.py --device cuda
    python benchmarks/bench_envs.py --num-envs 64 --repeats 2   # a quick smoke run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402


def policy_net(obs_dim: int, act_dim: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim, 512), nn.ELU(),
        nn.Linear(512, 256), nn.ELU(),
        nn.Linear(256, 128), nn.ELU(),
        nn.Linear(128, act_dim), nn.Tanh(),
    )


def time_per_call(fn, device: torch.device, repeats: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call of fn() after warm-up. Each repeat runs enough calls to
    last at least min_seconds, so small batches are not timer noise."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):  # warm-up: allocator, lazy init, caches
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-9)))
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def machine_name(device: torch.device) -> str:
    """The CPU model and core count, and the GPU's name when timing on one: every table needs it."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = f"{cpu}, {os.cpu_count()} cores"
    if device.type == "cuda":
        name += f", GPU {torch.cuda.get_device_name(device)}"
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-envs", type=int, nargs="+", default=[256, 4096, 65536])
    parser.add_argument("--tasks", nargs="+", default=envs.list_tasks())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-check-finite", action="store_true",
                        help="turn off the per-step finite check of actions (one host sync), as a GPU trainer would")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"machine: {machine_name(device)}; date {datetime.date.today()}")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"finite-action check {'off' if args.no_check_finite else 'on'}")
    header = f"{'task':<16}{'num_envs':>9}{'step (us)':>12}{'env steps/s':>14}{'forward (us)':>14}{'step/forward':>14}"
    print(header)
    print("-" * len(header))
    for task in args.tasks:
        for n in args.num_envs:
            env = envs.make_env(task, n, device=device, seed=0)
            env.check_finite_actions = not args.no_check_finite
            obs = env.reset()
            actions = torch.rand(n, env.act_dim, device=device) * 2 - 1
            net = policy_net(env.obs_dim, env.act_dim).to(device)

            step_s = time_per_call(lambda: env.step(actions), device, args.repeats)
            with torch.no_grad():
                fwd_s = time_per_call(lambda: net(obs), device, args.repeats)
            print(f"{task:<16}{n:>9}{step_s * 1e6:>12.1f}{n / step_s:>14.3g}"
                  f"{fwd_s * 1e6:>14.1f}{100 * step_s / fwd_s:>13.1f}%", flush=True)


if __name__ == "__main__":
    main()
