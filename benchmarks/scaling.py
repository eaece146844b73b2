"""How the cost of PQL grows with the work: env steps/s and V-updates/s of pql.py and
pql_threaded.py as the number of envs grows from 256 to 65536.

Each point is a short fixed run of one script (task Pendulum, the default networks 512-256-128,
8 V-updates per env step, 1 P-update per 2 V-updates) with `--log-interval 1`, so TensorBoard gets
charts/SPS and charts/v_updates_per_s after every iteration. Both are averages since the start
of training, so the rates here are taken between two logged points: from the end of the first
learning iteration (after 2 warm-up iterations of random actions, whose cost is left out with
the one-time costs of the first updates) to the end of the run:
    env steps/s = (step_b - step_a) / (t_b - t_a),  t = step / SPS
    V-updates/s = (v_b - v_a) / (t_b - t_a),        v = v_updates_per_s * t
The batch size grows with the envs, doubling when the envs quadruple: batch = 64 * sqrt(num_envs),
which gives 1024, 2048, 4096, 8192, 16384 for 256, 1024, 4096, 16384, 65536 envs. One iteration
is then one env step of num_envs envs (actor) and 8 critic plus 4 policy updates on `batch`
samples (learners), so the learners' share of the work grows half as fast as the actor's.
Each run is a Ray task that reserves all of the machine's cores (benchmarks/grid.py), so timed runs
never overlap on one machine; on a cluster, give each run a whole node (--cpus-per-run = its cores)
and compare only rows from one kind of node. The runs are kept under --logdir (default
benchmarks/logs/scaling) with a manifest.json (machine, dates, commands), for benchmarks/plots.py,
and done.json (the finished runs: an interrupted grid resumes with the rest).

    python benchmarks/scaling.py                      # 256 .. 65536 envs, 20 timed iterations each: about 7 minutes on 2 cores
    python benchmarks/scaling.py --quick              # 256 and 1024 envs, networks 64-64: a minute
    python benchmarks/scaling.py --device cuda --num-envs 4096 16384 65536
"""
import argparse
import datetime
import glob
import json
import math
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import grid  # noqa: E402
from solve_times import read_scalars  # noqa: E402

SCRIPTS = ["pql.py", "pql_threaded.py"]
NUM_ENVS = [256, 1024, 4096, 16384, 65536]
QUICK_NUM_ENVS = [256, 1024]
WARMUP_ITERATIONS = 2
DEFAULT_LOGDIR = os.path.join(HERE, "logs", "scaling")


def batch_size(num_envs):
    return int(round(64 * math.sqrt(num_envs)))


def measured_iterations(quick):
    """Iterations timed after the first learning one. pql_threaded.py's actor may run up to one
    iteration ahead of the learners, and how far ahead it is at the two timed points can differ by
    up to one iteration, so its rates carry an error of up to 1/iterations: 20 keeps it under 5%.
    The table's "V-updates per iteration" column shows it (8 when the two points agree)."""
    return 4 if quick else 20


def exp_name(script, num_envs):
    return f"scale-{script.replace('.py', '')}-{num_envs}-{batch_size(num_envs)}"


def run_one(script, num_envs, device, task, hidden_dims, quick, logdir):
    """One timed run in a subprocess, in logdir; a Ray task (benchmarks/grid.py) that reserves the
    machine's cores, so no other run competes with its timing. An unfinished attempt's folder goes first."""
    name = exp_name(script, num_envs)
    for stale in glob.glob(os.path.join(logdir, "runs", f"*__{name}__1__*")):
        shutil.rmtree(stale)
    iterations = WARMUP_ITERATIONS + 1 + measured_iterations(quick)
    command = [sys.executable, os.path.join(REPO, script), "--task", task, "--device", device, "--seed", "1",
               "--num-envs", str(num_envs), "--batch-size", str(batch_size(num_envs)),
               "--warmup-iterations", str(WARMUP_ITERATIONS), "--total-timesteps", str(num_envs * iterations),
               "--log-interval", "1", "--save-interval", "1e9", "--exp-name", name]
    if hidden_dims:
        command += ["--hidden-dims", *map(str, hidden_dims)]
    result = grid.run_process(command, cwd=logdir)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    return " ".join(command[1:]).replace(REPO + "/", "")


def rates(run_dir):
    """(iterations timed, seconds per iteration, env steps/s, V-updates/s) from one run's scalars."""
    sps = read_scalars(run_dir, "charts/SPS")
    vps = dict(read_scalars(run_dir, "charts/v_updates_per_s"))
    points = [(step, step / value, vps[step] * step / value) for step, value in sps]  # (step, t, v)
    (step_a, t_a, v_a), (step_b, t_b, v_b) = points[WARMUP_ITERATIONS], points[-1]
    num_envs = points[0][0]  # logged after every iteration: the first step is one iteration of all envs
    iterations = (step_b - step_a) // num_envs
    return iterations, (t_b - t_a) / iterations, (step_b - step_a) / (t_b - t_a), (v_b - v_a) / (t_b - t_a)


def collect(logdir):
    """All scaling runs found in logdir: list of dicts, sorted by script and num_envs."""
    rows = []
    for run_dir in glob.glob(os.path.join(logdir, "runs", "*__scale-*__1__*")):
        _, name, _, _ = os.path.basename(run_dir).split("__")
        _, script, num_envs, batch = name.split("-")
        iterations, seconds, sps, vps = rates(run_dir)
        rows.append(dict(script=script + ".py", num_envs=int(num_envs), batch=int(batch), iterations=iterations,
                         seconds_per_iteration=seconds, env_steps_per_s=sps, v_updates_per_s=vps))
    return sorted(rows, key=lambda r: (SCRIPTS.index(r["script"]) if r["script"] in SCRIPTS else 9, r["num_envs"]))


def print_table(rows, header):
    print(header + "\n")
    print("| script | num_envs | batch | iterations timed | s per iteration | env steps/s | V-updates/s | V-updates per iteration | cost per iteration vs the fewest envs |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {r["script"]: r["seconds_per_iteration"] for r in rows if r["num_envs"] == min(x["num_envs"] for x in rows)}
    for r in rows:
        relative = r["seconds_per_iteration"] / base[r["script"]] if r["script"] in base else float("nan")
        print(f"| {r['script']} | {r['num_envs']:,} | {r['batch']:,} | {r['iterations']} | {r['seconds_per_iteration']:.3f} |"
              f" {r['env_steps_per_s']:,.0f} | {r['v_updates_per_s']:.1f} |"
              f" {r['v_updates_per_s'] * r['seconds_per_iteration']:.2f} | {relative:.1f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, nargs="+", default=None, help=f"default {NUM_ENVS} ({QUICK_NUM_ENVS} with --quick)")
    parser.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    parser.add_argument("--task", default="Pendulum")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR)
    parser.add_argument("--quick", action="store_true", help="256 and 1024 envs, networks 64-64, 4 timed iterations")
    parser.add_argument("--no-run", action="store_true", help="print the table from the runs already in --logdir")
    grid.add_arguments(parser)
    args = parser.parse_args()
    num_envs = args.num_envs or (QUICK_NUM_ENVS if args.quick else NUM_ENVS)
    hidden_dims = [64, 64] if args.quick else None  # None: the scripts' default 512-256-128
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
    else:
        import torch
        from bench_envs import machine_name
        # Resume: the runs already timed in this folder count, if they had the same settings.
        settings = dict(device=args.device, task=args.task, hidden_dims=hidden_dims or [512, 256, 128])
        if manifest is not None and any(manifest[key] != value for key, value in settings.items()):
            parser.error(f"--logdir {logdir} holds runs with other settings ({ {k: manifest[k] for k in settings} }):"
                         " pass another --logdir, or remove that one to start over")
        done, start = grid.Done(logdir), time.time()
        jobs = [(exp_name(script, n), run_one, (script, n, args.device, args.task, hidden_dims, args.quick, logdir))
                for n in num_envs for script in args.scripts if exp_name(script, n) not in done]

        def record(name, command):  # in this process, as each run ends
            done.add(name, command)
            print(f"# {name} done", flush=True)

        grid.run_grid(jobs, args.address, args.cpus_per_run, args.gpus_per_run, args.device, on_done=record)
        earlier = manifest or {}
        manifest = dict(machine=machine_name(torch.device(args.device)), date=str(datetime.date.today()),
                        first_date=earlier.get("first_date", earlier.get("date", str(datetime.date.today()))),
                        commands=sorted(done.runs.values()), torch=torch.__version__, threads=torch.get_num_threads(),
                        wall_minutes=round(earlier.get("wall_minutes", 0.0) + (time.time() - start) / 60, 1), **settings)
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)

    header = (f"Machine: {manifest['machine']}, device {manifest['device']}, torch {manifest['torch']} ({manifest['threads']} threads);"
              f" date {manifest['date'] if manifest.get('first_date', manifest['date']) == manifest['date'] else manifest['first_date'] + ' to ' + manifest['date']}; task {manifest['task']}, networks {'-'.join(map(str, manifest['hidden_dims']))};"
              f" whole run {manifest['wall_minutes']} min")
    print()
    print_table(collect(logdir), header)
    print("\nCommands (run in --logdir):")
    for command in manifest["commands"]:
        print(f"    python {command}")


if __name__ == "__main__":
    main()
