"""What does stepping Gymnasium's MuJoCo tasks cost, and what does the `gym:` adapter add to it?

For each task and number of envs, steps with random actions (after a warm-up) and prints env steps/s of:

    single    one gymnasium.make env in a Python loop, num_envs steps per "step": the floor
    sync      gymnasium.make_vec(..., "sync", same-step autoreset): what envs.py's adapter wraps
    async     gymnasium.make_vec(..., "async", same-step autoreset): one worker process per env
    adapter   envs.make_env("gym:<id>"): sync plus the adapter's work (torch <-> numpy, the final
              observations, episode statistics), with torch actions in [-1, 1]

and the adapter's cost over `sync` (its share of each step), so the question "would an async vector
env, or fewer Python calls per step, pay on this machine?" has numbers. Each figure is the best of
--repeats timings, the paths in turns so that a slow patch of the machine hits them all.

    python benchmarks/gym_speed.py                                   # HalfCheetah-v5 and Hopper-v5, 1 to 64 envs
    python benchmarks/gym_speed.py --tasks Hopper-v5 --num-envs 2 --steps 50 --repeats 1   # a smoke run
"""
import argparse
import datetime
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import envs  # noqa: E402
from bench_envs import machine_name  # noqa: E402

PATHS = ("single", "sync", "async", "adapter")


def make(path, task, num_envs, seed):
    """A function that makes one step of num_envs envs with random actions, and the env to close."""
    import gymnasium as gym
    rng = np.random.default_rng(seed)
    if path == "adapter":
        env = envs.make_env("gym:" + task, num_envs, seed=seed)
        env.reset()
        generator = torch.Generator().manual_seed(seed)
        return (lambda: env.step(torch.rand(num_envs, env.act_dim, generator=generator) * 2 - 1)), env
    if path == "single":
        env = gym.make(task)
        env.reset(seed=seed)
        space = env.action_space

        def step():
            for _ in range(num_envs):
                _, _, terminated, truncated, _ = env.step(rng.uniform(space.low, space.high))
                if terminated or truncated:
                    env.reset()
        return step, env
    env = gym.make_vec(task, num_envs=num_envs, vectorization_mode=path,
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    env.reset(seed=seed)
    space = env.single_action_space
    return (lambda: env.step(rng.uniform(space.low, space.high, size=(num_envs, *space.shape)))), env


def steps_per_second(step, num_envs, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * num_envs / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["HalfCheetah-v5", "Hopper-v5"], help="Gymnasium ids")
    parser.add_argument("--num-envs", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--steps", type=int, default=300, help="vector steps per timing (after 20 of warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the best is kept")
    args = parser.parse_args()
    if min(args.num_envs) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--num-envs, --steps and --repeats must be >= 1")
    torch.set_num_threads(1)  # the adapter's few small tensors gain nothing from threads
    print(f"gym_speed.py on {machine_name(torch.device('cpu'))}, {datetime.date.today()}, torch {torch.__version__};"
          f" best of {args.repeats} x {args.steps} vector steps\n")
    header = " | ".join(f"{path} env steps/s" for path in args.paths)
    cost = " adapter's share of a step |" if {"sync", "adapter"} <= set(args.paths) else ""
    print(f"| task | envs | {header} |{cost}")
    print("|---|---|" + "---|" * len(args.paths) + ("---|" if cost else ""))
    for task in args.tasks:
        for num_envs in args.num_envs:
            steppers = {path: make(path, task, num_envs, seed=0) for path in args.paths}
            best = {path: 0.0 for path in args.paths}
            for path, (step, _) in steppers.items():
                steps_per_second(step, num_envs, 20)  # warm-up
            for _ in range(args.repeats):
                for path, (step, _) in steppers.items():
                    best[path] = max(best[path], steps_per_second(step, num_envs, args.steps))
            for _, env in steppers.values():
                env.close()
            row = " | ".join(f"{best[path]:,.0f}" for path in args.paths)
            share = f" {1 - best['adapter'] / best['sync']:.0%} |" if cost else ""
            print(f"| {task} | {num_envs} | {row} |{share}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
