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
The runs are kept under --logdir (emptied first; default benchmarks/logs/scaling) with a
manifest.json (machine, date, commands), for benchmarks/plots.py.

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
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
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
    name = exp_name(script, num_envs)
    iterations = WARMUP_ITERATIONS + 1 + measured_iterations(quick)
    command = [sys.executable, os.path.join(REPO, script), "--task", task, "--device", device, "--seed", "1",
               "--num-envs", str(num_envs), "--batch-size", str(batch_size(num_envs)),
               "--warmup-iterations", str(WARMUP_ITERATIONS), "--total-timesteps", str(num_envs * iterations),
               "--log-interval", "1", "--save-interval", "1e9", "--exp-name", name]
    if hidden_dims:
        command += ["--hidden-dims", *map(str, hidden_dims)]
    result = subprocess.run(command, cwd=logdir, capture_output=True, text=True)
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
    print("| script | num_envs | batch | iterations timed | s per iteration | env steps/s | V-updates/s | V-updates per iteration | cost per iteration vs 256 envs |")
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
    args = parser.parse_args()
    num_envs = args.num_envs or (QUICK_NUM_ENVS if args.quick else NUM_ENVS)
    hidden_dims = [64, 64] if args.quick else None  # None: the scripts' default 512-256-128
    logdir = os.path.abspath(args.logdir)
    os.makedirs(logdir, exist_ok=True)
    manifest_path = os.path.join(logdir, "manifest.json")

    if args.no_run:
        if not os.path.isfile(manifest_path):
            parser.error(f"--no-run: no runs in {logdir} (no manifest.json): run without --no-run first")
        with open(manifest_path) as f:
            manifest = json.load(f)
    else:
        import torch
        from bench_envs import machine_name
        shutil.rmtree(os.path.join(logdir, "runs"), ignore_errors=True)  # one invocation, one consistent set of runs
        start, commands = time.time(), []
        for n in num_envs:
            for script in args.scripts:
                commands.append(run_one(script, n, args.device, args.task, hidden_dims, args.quick, logdir))
                print(f"# {script} {n} envs done", flush=True)
        manifest = dict(machine=machine_name(torch.device(args.device)), device=args.device, date=str(datetime.date.today()),
                        task=args.task, hidden_dims=hidden_dims or [512, 256, 128], commands=commands,
                        torch=torch.__version__, threads=torch.get_num_threads(), wall_minutes=round((time.time() - start) / 60, 1))
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1)

    header = (f"Machine: {manifest['machine']}, device {manifest['device']}, torch {manifest['torch']} ({manifest['threads']} threads);"
              f" date {manifest['date']}; task {manifest['task']}, networks {'-'.join(map(str, manifest['hidden_dims']))};"
              f" whole run {manifest['wall_minutes']} min")
    print()
    print_table(collect(logdir), header)
    print("\nCommands (run in --logdir):")
    for command in manifest["commands"]:
        print(f"    python {command}")


if __name__ == "__main__":
    main()
