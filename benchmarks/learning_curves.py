"""PQL against PPO on the built-in tasks: episodic return against env steps and against seconds.

Trains pql.py, pql_threaded.py and PPO from rsl_rl (benchmarks/ppo.py) on each task and seed, each
run a Ray task that reserves the machine's cores (benchmarks/grid.py: one run at a time on one
machine, many at once on a cluster), with the same wall-clock budget per task for every method,
keeps their TensorBoard logs under --logdir (default benchmarks/logs/learning) with a manifest.json
(machine, dates, budgets, commands) and done.json (the finished runs: a grid stopped part-way
resumes with the rest), and prints Markdown tables: per method, how many seeds reached
the solved score, the env steps and training seconds it took (mean over the seeds that reached it),
and the ratios PQL / PPO. `python benchmarks/plots.py` draws the curves from the same logs.

Solved means: the first logged mean *training* return (with each method's exploration noise)
at or above the task's score (solve_times.TASKS); seconds are training time, env steps /
charts/SPS at that point, without start-up. PQL runs with the README's CPU quick-start settings
(solve_times.TASKS); PPO with rsl_rl's usual massively parallel settings (benchmarks/ppo.py).

    python benchmarks/learning_curves.py                  # 3 tasks x 3 methods x 3 seeds, about an hour on 2 cores
    python benchmarks/learning_curves.py --quick          # 1 seed, 25 s per run: a few minutes
    python benchmarks/learning_curves.py --no-run         # only print the tables from the logs already there
    python benchmarks/learning_curves.py --device cuda --seeds 1 2 3
    python benchmarks/learning_curves.py --tasks mjlab:Mjlab-Cartpole-Balance --methods pql --seeds 1 2 3 --logdir benchmarks/logs/mjlab
    python benchmarks/learning_curves.py --address auto --cpus-per-run 4 --logdir /shared/logs/learning   # on a Ray cluster
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import grid  # noqa: E402
from solve_times import TASKS, read_scalars, time_to_solve  # noqa: E402

# Method name (also the run's exp_name) -> the script that trains it, relative to the repo.
METHODS = {"pql": "pql.py", "pql_threaded": "pql_threaded.py", "ppo": "benchmarks/ppo.py"}
LABELS = {"pql": "pql.py", "pql_threaded": "pql_threaded.py", "ppo": "PPO (rsl_rl)"}
# Seconds of training per run, the same for every method of a task. Sized so that the default
# run (3 tasks x 3 methods x 3 seeds, plus a few seconds of start-up per run) takes about an hour
# on a 2-core CPU: about 3x what pql.py needed to solve Pendulum and Reacher there (35 s each), and
# enough for pql_threaded.py, which needed up to 2x that. CartpoleSwingup gets what is left; pql.py
# had not solved it after 300,000 env steps (about 7 min), so its curve shows progress, not a solve.
BUDGETS = {"Pendulum": 120.0, "Reacher": 90.0, "CartpoleSwingup": 180.0,
           # mjlab's Cartpoles (needs mjlab; not in the default --tasks): 1000-step episodes, and on the CPU an
           # iteration takes ~0.12 s at 256 envs, so a run of pql.py logs one episode's return every ~2 minutes;
           # seeds 1-3 solved Balance with their 4th or 5th episode, after 8 to 10 minutes (docs/results.md).
           "mjlab:Mjlab-Cartpole-Balance": 720.0, "mjlab:Mjlab-Cartpole-Swingup": 900.0}
BUILT_IN_TASKS = [task for task in BUDGETS if ":" not in task]
QUICK_BUDGET = 25.0
DEFAULT_LOGDIR = os.path.join(HERE, "logs", "learning")


def machine_description(device):
    """CPU model and cores (and the GPU's name on CUDA): every table carries it."""
    import torch
    from bench_envs import machine_name
    return machine_name(torch.device(device))


def command_for(method, task, seed, device, budget):
    command = [sys.executable, os.path.join(REPO, METHODS[method]), "--task", task, "--seed", str(seed), "--device", device,
               "--max-time", str(budget), "--total-timesteps", str(10**10), "--exp-name", method]
    if method != "ppo":
        command += TASKS[task]["flags"]
    return command


def run_dirs(logdir, task, method, seed):
    run_name = f"{task.replace(':', '-')}__{method}__{seed}"  # as the training scripts name their runs
    return sorted(glob.glob(os.path.join(logdir, "runs", f"{run_name}__*")))


def train(method, task, seed, device, budget, logdir):
    """One training run in a subprocess, in logdir (it writes logdir/runs/{task}__{method}__{seed}__{time}).
    Runs as a Ray task (benchmarks/grid.py); a folder left by an unfinished attempt is removed first."""
    for stale in run_dirs(logdir, task, method, seed):
        shutil.rmtree(stale)
    command = command_for(method, task, seed, device, budget)
    result = grid.run_process(command, cwd=logdir)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    return " ".join(command[1:]).replace(REPO + "/", "")


def summarize(logdir, tasks, methods, seeds):
    """Per (task, method): solved count, mean steps and seconds to solve, mean final return and SPS."""
    rows = {}
    for task in tasks:
        for method in methods:
            steps, seconds, finals, sps, found = [], [], [], [], 0
            for seed in seeds:
                dirs = run_dirs(logdir, task, method, seed)
                if not dirs:
                    continue
                found += 1
                step, second, final = time_to_solve(dirs[-1], TASKS[task]["solved"])
                if step is not None:
                    steps.append(step)
                    seconds.append(second)
                finals.append(final)
                speed = read_scalars(dirs[-1], "charts/SPS")
                if speed:
                    sps.append(speed[-1][1])
            rows[task, method] = dict(runs=found, solved=len(steps), steps=mean(steps), seconds=mean(seconds),
                                      final=mean(finals), sps=mean(sps))
    return rows


def mean(values):
    values = [v for v in values if v == v]  # drop NaN (a run that logged no episode)
    return sum(values) / len(values) if values else None


def fmt(value, pattern):
    return "-" if value is None else format(value, pattern)


def print_tables(rows, tasks, methods, header, budgets):
    print(header + "\n")
    print("| task (solved score) | method | seeds solved | env steps to solve | seconds to solve | final return | env steps/s |")
    print("|---|---|---|---|---|---|---|")
    for task in tasks:
        for method in methods:
            r = rows[task, method]
            if r["runs"] == 0:
                continue
            print(f"| {task} ({TASKS[task]['solved']:g}) | {LABELS[method]} | {r['solved']}/{r['runs']} | {fmt(r['steps'], ',.0f')} |"
                  f" {fmt(r['seconds'], '.1f')} | {fmt(r['final'], '.1f')} | {fmt(r['sps'], ',.0f')} |")
    print(f"\nMeans over the seeds that reached the score; budget per run (training seconds): "
          + ", ".join(f"{task} {budgets[task]:g}" for task in tasks) + ".")
    pql_methods = [m for m in methods if m != "ppo"]
    if "ppo" not in methods or not pql_methods:
        return
    print("\nRatios PQL / PPO (below 1: PQL needs less), from the means above:\n")
    print("| task | " + " | ".join(f"{LABELS[m]} / PPO env steps | {LABELS[m]} / PPO seconds" for m in pql_methods) + " |")
    print("|---|" + "---|---|" * len(pql_methods))
    for task in tasks:
        ppo, cells = rows[task, "ppo"], []
        for method in pql_methods:
            r = rows[task, method]
            for key, pattern in (("steps", ".4f"), ("seconds", ".2f")):
                ok = r[key] is not None and ppo[key] is not None
                cells.append(format(r[key] / ppo[key], pattern) if ok else "-")
        print(f"| {task} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=BUILT_IN_TASKS, choices=list(BUDGETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR, help="where the TensorBoard runs are kept (under runs/)")
    parser.add_argument("--quick", action="store_true", help=f"one seed, {QUICK_BUDGET:g} s per run")
    parser.add_argument("--max-time", type=float, default=None, help="training seconds per run, for every task (overrides the budgets)")
    parser.add_argument("--no-run", action="store_true", help="print the tables from the runs already in --logdir")
    grid.add_arguments(parser)
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    budgets = {task: args.max_time or (QUICK_BUDGET if args.quick else BUDGETS[task]) for task in args.tasks}
    logdir = os.path.abspath(args.logdir)
    os.makedirs(logdir, exist_ok=True)
    manifest_path = os.path.join(logdir, "manifest.json")
    manifest = None
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)

    if args.no_run:
        if manifest is None:
            parser.error(f"--no-run: no runs in {logdir} (no manifest.json): run without --no-run first")
        budgets = manifest["budgets"]
        args.tasks = [task for task in args.tasks if task in manifest["tasks"]]
        args.methods = [method for method in args.methods if method in manifest["methods"]]
    else:
        # Resume: the runs already finished in this folder count, if they had the same budgets and device.
        if manifest is not None:
            other = {t: b for t, b in manifest["budgets"].items() if t in budgets and b != budgets[t]}
            if other or manifest["device"] != args.device:
                parser.error(f"--logdir {logdir} holds runs with other budgets {other} or device {manifest['device']}:"
                             " pass another --logdir, or remove that one to start over")
        done, start = grid.Done(logdir), time.time()
        jobs = [(f"{task}__{method}__{seed}", train, (method, task, seed, args.device, budgets[task], logdir))
                for task in args.tasks for method in args.methods for seed in seeds if f"{task}__{method}__{seed}" not in done]

        def record(name, command):  # in this process, as each run ends
            done.add(name, command)
            task, method, seed = name.split("__")
            r = summarize(logdir, [task], [method], [int(seed)])[task, method]
            print(f"# {task} {LABELS[method]} seed {seed}: solved at {fmt(r['steps'], ',.0f')} env steps,"
                  f" {fmt(r['seconds'], '.1f')} s; final return {fmt(r['final'], '.1f')}", flush=True)

        grid.run_grid(jobs, args.address, args.cpus_per_run, args.gpus_per_run, args.device, on_done=record)
        earlier = manifest or {}
        manifest = dict(machine=machine_description(args.device), device=args.device, date=str(datetime.date.today()),
                        first_date=earlier.get("first_date", earlier.get("date", str(datetime.date.today()))),
                        budgets={**earlier.get("budgets", {}), **budgets},
                        seeds=sorted(set(earlier.get("seeds", [])) | set(seeds)),
                        tasks=[t for t in BUDGETS if t in set(earlier.get("tasks", [])) | set(args.tasks)],
                        methods=[m for m in METHODS if m in set(earlier.get("methods", [])) | set(args.methods)],
                        commands=sorted(done.runs.values()),
                        wall_minutes=round(earlier.get("wall_minutes", 0.0) + (time.time() - start) / 60, 1))
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)

    dates = manifest["date"] if manifest.get("first_date", manifest["date"]) == manifest["date"] else f"{manifest['first_date']} to {manifest['date']}"
    header = (f"Machine: {manifest['machine']}, device {manifest['device']}; date {dates};"
              f" seeds {' '.join(map(str, manifest['seeds']))}; whole run {manifest['wall_minutes']} min")
    rows = summarize(logdir, args.tasks, args.methods, manifest["seeds"])
    print()
    print_tables(rows, args.tasks, args.methods, header, budgets)
    print("\nCommands (run in --logdir):")
    for command in manifest["commands"]:
        print(f"    python {command}")


if __name__ == "__main__":
    main()
