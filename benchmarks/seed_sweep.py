"""Does PQL solve a task on every seed? The solve rate of each variant over many seeds.

Trains each variant (a script and its flags) at the README's CPU quick-start settings for every
seed (by default Pendulum: 64 envs, networks 64-64, batch 1024, 100,000 env steps; --task picks
another task, with the settings, budget and solved score solve_times.py gives it), each run a Ray
task that reserves the machine's cores (benchmarks/grid.py: one run at a time here, many at once
on a cluster with --address), and prints one row per variant: seeds solved, env steps to solve
(median, quartiles, range), and the final return of the deterministic policy.

A seed counts as solved when the deterministic policy of its final checkpoint scores at least the
solved score (Pendulum -200) over 20 episodes; its env steps to solve are where the policy itself
first scored that during training (the deterministic policy on the scripts' evaluation envs,
eval/episodic_return), or the budget if only the final evaluation did. The other tables in
docs/results.md read "solved" from the training return, which mixes in exploration noise up to
std 0.8 and can stay below -200 while the policy scores -140; the table shows that count too, in
its last column.

Every finished run is appended to a results file, one JSON line per run, and runs already in it
are skipped, so a sweep can be stopped and resumed over several sittings; commit the file to keep
the runs. A candidate change gets its own --label, so its rows stand beside the defaults'.

    python benchmarks/seed_sweep.py                          # 4 variants x 20 seeds, the defaults
    python benchmarks/seed_sweep.py --variants pql.py --seeds 1 2 3
    python benchmarks/seed_sweep.py --label std-max-0.4 --extra="--std-max 0.4"
    python benchmarks/seed_sweep.py --no-run                 # only the table, from the results file
    python benchmarks/seed_sweep.py --task CartpoleSwingup --variants pql.py --seeds 1 2 3
    python benchmarks/seed_sweep.py --address auto --cpus-per-run 2 --results /shared/seed_sweep.jsonl   # on a Ray cluster
"""
import datetime
import glob
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import tyro

import grid
from solve_times import TASKS, read_scalars  # TASKS: each task's quick-start flags, env-step budget and solved score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_EPISODES = 20


@dataclass
class Args:
    task: str = "Pendulum"
    """task to train, at its CPU quick-start settings (solve_times.py): Pendulum, Reacher, CartpoleSwingup, or an mjlab Cartpole
    (which runs no evaluation envs, so its env steps to solve are the budget wherever its final policy solves it)"""
    variants: Tuple[str, ...] = ("pql.py", "pql.py --distributional", "pql_threaded.py", "pql_threaded.py --distributional")
    """training scripts, each with its flags"""
    seeds: Tuple[int, ...] = tuple(range(1, 21))
    """seeds to run for every variant"""
    budget: Optional[int] = None
    """env steps per run, summed over the envs; default: the task's in solve_times.py (Pendulum 100,000)"""
    label: str = "defaults"
    """name of the settings under test; runs with different labels are kept apart"""
    extra: str = ""
    """flags passed on to every run of this label, in one string, e.g. `--extra="--std-max 0.4"`"""
    device: str = "cpu"
    """device of the runs"""
    results: str = os.path.join(REPO, "benchmarks", "results", "seed_sweep.jsonl")
    """the results file: one JSON line per finished run; runs already in it are skipped"""
    no_run: bool = False
    """print the table from the results file only"""
    quick: bool = False
    """smoke test: one seed, just past the first episode (the test suite runs this with its own --results)"""
    address: Optional[str] = None
    """Ray cluster to run on (`auto`: the one this node belongs to); default: a private instance on this machine (benchmarks/grid.py)"""
    cpus_per_run: Optional[float] = None
    """cores each run reserves; default: all of this machine's cores, so runs go one at a time"""
    gpus_per_run: Optional[float] = None
    """GPUs each run reserves; default: 1 with --device cuda, else 0"""


def machine():
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores"


def code_version():
    """The commit the runs train with, marked when the training scripts differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "pql.py", "pql_threaded.py", "envs.py"], cwd=REPO,
                                 capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return (commit + "+changes" if changed else commit) or None


def first_step_at_or_above(points, score):
    return next((step for step, value in points if value >= score), None)


def run_one(variant, seed, args):
    """Train one seed in a temporary folder, evaluate its checkpoint, and return the result line.
    Runs as a Ray task (benchmarks/grid.py), on whichever node has room."""
    script, *variant_flags = variant.split()
    command = [sys.executable, os.path.join(REPO, script), "--task", args.task, *TASKS[args.task]["flags"], "--seed", str(seed), "--device", args.device,
               "--total-timesteps", str(args.budget), *variant_flags, *shlex.split(args.extra)]
    run_root = tempfile.mkdtemp(prefix="seed_sweep_")
    training = grid.run_process(command, cwd=run_root)
    if training.returncode != 0:
        shutil.rmtree(run_root)
        raise RuntimeError(f"{' '.join(command)} failed:\n{training.stderr[-3000:]}")
    (run_dir,) = glob.glob(os.path.join(run_root, "runs", "*"))
    evaluation = grid.run_process([sys.executable, os.path.join(REPO, "pql.py"), "--eval-checkpoint", os.path.join(run_dir, "model.pt"),
                                   "--eval-episodes", str(EVAL_EPISODES), "--device", args.device], cwd=run_root)
    if evaluation.returncode != 0:
        shutil.rmtree(run_root)
        raise RuntimeError(f"evaluation of {run_dir} failed:\n{evaluation.stderr[-3000:]}")
    train_returns = read_scalars(run_dir, "charts/episodic_return")
    eval_returns = read_scalars(run_dir, "eval/episodic_return")
    sps = read_scalars(run_dir, "charts/SPS")
    shutil.rmtree(run_root)  # the result line keeps what the table needs
    solved_score = TASKS[args.task]["solved"]
    return {
        "task": args.task, "label": args.label, "variant": variant, "seed": seed, "budget": args.budget, "device": args.device,
        "command": " ".join(command[1:]).replace(REPO + "/", ""),
        "steps_to_solve": first_step_at_or_above(train_returns, solved_score),
        "final_training_return": train_returns[-1][1] if train_returns else None,
        "deterministic_steps_to_solve": first_step_at_or_above(eval_returns, solved_score),
        "deterministic_return": float(evaluation.stdout.split("mean return ")[1].split()[0]),
        "env_steps_per_s": sps[-1][1] if sps else None,
        "date": str(datetime.date.today()), "machine": machine(), "commit": code_version(),
    }


def task_of(result):
    return result.get("task", "Pendulum")  # the runs from before --task are all Pendulum's


def solved(result):
    """The deterministic policy of the final checkpoint scores at least the solved score over 20 episodes."""
    return result["deterministic_return"] >= TASKS[task_of(result)]["solved"]


def steps_to_solve(result):
    """Where the policy itself first scored the solved score during training (eval/episodic_return, a
    mean over the 4 evaluation envs' episodes, logged as they end); if it never did there, the
    budget, when the final checkpoint's 20-episode evaluation does."""
    if result["deterministic_steps_to_solve"] is not None:
        return result["deterministic_steps_to_solve"]
    return result["budget"] if solved(result) else None


def table(results):
    """One Markdown row per (label, variant, budget); each variant's labels side by side. The runs
    are of one task."""
    solved_score = TASKS[task_of(results[0])]["solved"]
    header = ("| label | variant | seeds solved | env steps to solve: median [quartiles] (range) | final deterministic return:"
              f" median (worst) | seeds not solved | training return reached {solved_score:g} |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    groups = {}
    for result in results:
        groups.setdefault((result["label"], result["variant"], result["budget"]), []).append(result)
    labels = list(dict.fromkeys(r["label"] for r in results))
    variants = list(dict.fromkeys(r["variant"] for r in results))
    for (label, variant, budget), runs in sorted(groups.items(), key=lambda g: (variants.index(g[0][1]), labels.index(g[0][0]), g[0][2])):
        runs.sort(key=lambda r: r["seed"])
        steps = sorted(steps_to_solve(r) for r in runs if solved(r))
        if len(steps) >= 2:
            q1, median, q3 = statistics.quantiles(steps, n=4, method="inclusive")
            spread = f"{median:,.0f} [{q1:,.0f}, {q3:,.0f}] ({steps[0]:,} to {steps[-1]:,})"
        else:
            spread = f"{steps[0]:,}" if steps else "-"
        returns = [r["deterministic_return"] for r in runs]
        stuck = ", ".join(f"{r['seed']} ({r['deterministic_return']:.0f})" for r in runs if not solved(r)) or "none"
        # The criterion of the other tables in docs/results.md: the training return, with exploration noise.
        training_solved = sorted(r["steps_to_solve"] for r in runs if r["steps_to_solve"] is not None)
        training = f"{len(training_solved)}/{len(runs)}" + (f", median {statistics.median(training_solved):,.0f}" if training_solved else "")
        lines.append(f"| {label} | `{variant}` | {len(steps)}/{len(runs)} | {spread} | {statistics.median(returns):.1f}"
                     f" ({min(returns):.1f}) | {stuck} | {training} |")
    return "\n".join(lines)


def main():
    args = tyro.cli(Args)
    if args.task not in TASKS:
        print(f"error: --task must be one of {', '.join(TASKS)}; got {args.task!r}", file=sys.stderr)
        return 2
    if args.quick:
        args.seeds, args.budget = args.seeds[:1], TASKS[args.task]["quick"]  # just past the first episode end
    elif args.budget is None:
        args.budget = TASKS[args.task]["budget"]
    flags = TASKS[args.task]["flags"]
    num_envs = int(flags[flags.index("--num-envs") + 1])
    if args.budget < num_envs or not args.seeds or not args.variants:
        print(f"error: --budget must be >= {num_envs} (one step of the {num_envs} envs), and --seeds and --variants must not be empty",
              file=sys.stderr)
        return 2
    results = []
    if os.path.exists(args.results):
        with open(args.results) as f:
            results = [json.loads(line) for line in f if line.strip()]
    if not args.no_run:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        done = {(task_of(r), r["label"], r["variant"], r["seed"], r["budget"], r["device"]) for r in results}
        jobs = [((variant, seed), run_one, (variant, seed, args)) for variant in args.variants for seed in args.seeds
                if (args.task, args.label, variant, seed, args.budget, args.device) not in done]

        def record(key, result):  # in this process, as each run ends: the results file has one writer
            results.append(result)
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"# {args.label} | {result['variant']} | seed {result['seed']}: solved at {result['steps_to_solve']} env steps,"
                  f" deterministic return {result['deterministic_return']:.1f}", flush=True)

        grid.run_grid(jobs, args.address, args.cpus_per_run, args.gpus_per_run, args.device, on_done=record)
    shown = [r for r in results if task_of(r) == args.task and r["budget"] == args.budget and r["device"] == args.device]
    if not shown:
        print(f"error: no runs in {args.results} for --task {args.task} --budget {args.budget} --device {args.device};"
              " run without --no-run first", file=sys.stderr)
        return 2
    results_path = os.path.relpath(args.results, REPO) if os.path.abspath(args.results).startswith(REPO + os.sep) else args.results
    print(f"\n{args.task} at the CPU quick-start settings, {args.budget:,} env steps; runs from {results_path}"
          f" (dates {min(r['date'] for r in shown)} to {max(r['date'] for r in shown)}; {shown[-1]['machine']})\n")
    print(table(shown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
