"""Env steps and wall-clock minutes for PQL to reach the solved score on each built-in task.

Runs each variant (a training script and its flags: pql.py, pql_threaded.py, pql.py with the
distributional critic) in subprocesses with the settings below, each a Ray task that reserves the
machine's cores (benchmarks/grid.py: one run at a time on one machine),
reads the TensorBoard scalars they write, and prints a Markdown table for docs/results.md: the first
logged point where the mean training episodic return (with exploration noise) reaches the solved
score, as env steps and as seconds of training (from charts/SPS = env steps / seconds).

    python benchmarks/solve_times.py                      # the table of docs/results.md, on this machine
    python benchmarks/solve_times.py --quick              # a smoke run of a few minutes
    python benchmarks/solve_times.py --device cuda --tasks Pendulum --variants pql.py pql_threaded.py
    python benchmarks/solve_times.py --resume-dir benchmarks/logs/solve_times   # keeps finished runs; run again to resume
    python benchmarks/solve_times.py --tasks mjlab:Mjlab-Cartpole-Balance --variants pql.py --seeds 1   # needs mjlab
"""
import argparse
import datetime
import glob
import os
import platform
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import grid  # noqa: E402

# Solved score (mean training return), env-step budget, and settings per task. The settings are the
# README's CPU quick-start: small networks and few envs, so that a 2-core machine solves each task in minutes.
TASKS = {
    "Pendulum": dict(solved=-200.0, budget=100_000, quick=64 * 210, flags=["--num-envs", "64", "--hidden-dims", "64", "64", "--batch-size", "1024"]),
    "Reacher": dict(solved=-8.0, budget=100_000, quick=64 * 60, flags=["--num-envs", "64", "--hidden-dims", "128", "128", "--batch-size", "1024"]),
    "CartpoleSwingup": dict(solved=700.0, budget=300_000, quick=64 * 1010, flags=["--num-envs", "64", "--hidden-dims", "128", "128", "--batch-size", "1024"]),
    # mjlab's Cartpoles (pip install -r requirements-mjlab.txt): 1000-step episodes, rewards times the 0.05 s control
    # step, so returns lie in [0, 50]; solved: 90% of that for Balance, 70% for Swingup (CartpoleSwingup's 700 of
    # 1000). Not in the default --tasks: they need mjlab. On the CPU Warp's step costs about the same ~45 ms for 4
    # or 256 envs, so these run 256 envs, and no evaluation envs (a second mjlab env: another ~45 ms per iteration).
    "mjlab:Mjlab-Cartpole-Balance": dict(solved=45.0, budget=256 * 6000, quick=256 * 1010, flags=["--num-envs", "256", "--hidden-dims", "64", "64", "--batch-size", "1024", "--eval-envs", "0"]),
    "mjlab:Mjlab-Cartpole-Swingup": dict(solved=35.0, budget=256 * 10_000, quick=256 * 1010, flags=["--num-envs", "256", "--hidden-dims", "128", "128", "--batch-size", "1024", "--eval-envs", "0"]),
}
BUILT_IN_TASKS = [task for task in TASKS if ":" not in task]
VARIANTS = ["pql.py", "pql_threaded.py", "pql.py --distributional"]


def read_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def time_to_solve(run_dir, solved):
    """(env steps, seconds, final return) at the first logged return >= solved, or (None, None, final)."""
    returns = read_scalars(run_dir, "charts/episodic_return")
    sps = dict(read_scalars(run_dir, "charts/SPS"))
    final = returns[-1][1] if returns else float("nan")
    for step, value in returns:
        if value >= solved:
            return step, step / sps[step], final
    return None, None, final


def final_sps(run_dir):
    """Env steps per second of training over the whole run (the last charts/SPS)."""
    sps = read_scalars(run_dir, "charts/SPS")
    return sps[-1][1] if sps else float("nan")


def run(variant, index, task, seed, device, budget, flags, extra):
    """One training run in a temporary folder; returns its row of the table. A Ray task
    (benchmarks/grid.py), on whichever node has room."""
    script, *variant_flags = variant.split()
    exp_name = f"bench{index}"
    command = [sys.executable, os.path.join(REPO, script), "--task", task, "--seed", str(seed), "--device", device,
               "--total-timesteps", str(budget), "--exp-name", exp_name, *flags, *variant_flags, *extra]
    with tempfile.TemporaryDirectory(prefix="solve_times_") as workdir:
        result = grid.run_process(command, cwd=workdir)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        (run_dir,) = glob.glob(os.path.join(workdir, "runs", f"*__{exp_name}__{seed}__*"))  # the task's ':' becomes '-' there
        steps, seconds, final = time_to_solve(run_dir, TASKS[task]["solved"])
        return (task, variant, seed, TASKS[task]["solved"], steps, seconds, final, final_sps(run_dir),
                " ".join(command[1:]).replace(REPO + "/", ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=BUILT_IN_TASKS, choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help="training scripts, each with its flags, to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one episode's budget, one seed: checks the pipeline only")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to every run")
    parser.add_argument("--resume-dir", default=None, help="keep each finished run's row in DIR/done.json and skip it when run"
                        " again (a grid stopped part-way resumes); default: keep nothing")
    grid.add_arguments(parser)
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    if args.resume_dir is not None:
        os.makedirs(args.resume_dir, exist_ok=True)
    done = grid.Done(args.resume_dir) if args.resume_dir is not None else {}

    keys, jobs = [], []
    for task in args.tasks:
        spec = TASKS[task]
        budget = spec["quick"] if args.quick else spec["budget"]  # quick: just past one episode
        for index, variant in enumerate(args.variants):
            for seed in seeds:
                key = " | ".join([task, variant, str(seed), str(budget), args.device, " ".join(args.extra)])
                keys.append(key)
                if key not in done:
                    jobs.append((key, run, (variant, index, task, seed, args.device, budget, spec["flags"], args.extra)))

    def report(key, row):  # in this process, as each run ends
        if args.resume_dir is not None:
            done.add(key, row)
        task, variant, seed, _, steps, seconds, final = row[:7]
        print(f"# {task} {variant} seed {seed}: solved at {steps} steps, {seconds} s; final return {final:.1f}", flush=True)

    results = grid.run_grid(jobs, args.address, args.cpus_per_run, args.gpus_per_run, args.device, on_done=report)
    earlier = done.runs if args.resume_dir is not None else {}
    rows = [results[key] if key in results else earlier[key] for key in keys]  # in the grid's order

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\nMachine: {cpu}, {os.cpu_count()} cores, device {args.device}; date {datetime.date.today()}\n")
    print("| task | variant | seed | solved score | env steps to solve | minutes to solve | final return | env steps/s | budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, variant, seed, solved, steps, seconds, final, sps, command in rows:
        budget = TASKS[task]["quick" if args.quick else "budget"]
        solved_steps = f"{steps:,}" if steps is not None else f"not within {budget:,}"
        minutes = f"{seconds / 60:.1f}" if seconds is not None else "-"
        print(f"| {task} | `{variant}` | {seed} | {solved:g} | {solved_steps} | {minutes} | {final:.1f} | {sps:,.0f} | {budget:,} |")
    print("\nCommands:")
    for row in rows:
        print(f"    python {row[-1]}")


if __name__ == "__main__":
    main()
