"""PQL against mjlab's own PPO on an mjlab task: the same seconds of training each, return against minutes.

mjlab ships each task with the PPO settings its authors train it with (rsl_rl's OnPolicyRunner,
`python -m mjlab.scripts.train <TaskId>`). This runs that script as it is, but for the number of
envs, the seed and TensorBoard instead of Weights & Biases as its logger, and `pql.py --task
mjlab:<TaskId>` with its defaults for the task (pql.TASK_DEFAULTS), one after the other on the same
device, each for --budget seconds of training (start-up and Warp's compiling not counted). Then it
prints each method's return after 1, 2, 5, 10, ... minutes of training and its env steps/s, and
draws the two curves into docs/mjlab_{TaskId}.png. A run whose log folder holds a finished.json is
not run again, so an interrupted comparison resumes.

    python benchmarks/mjlab_ppo.py                     # on a GPU: Mjlab-Velocity-Flat-Unitree-Go1, 4096 envs, 10 min each
    python benchmarks/mjlab_ppo.py --task Mjlab-Cartpole-Swingup --device cpu --num-envs 256 --budget 300 \\
        --pql-flags="--hidden-dims 128 128 --batch-size 1024 --eval-envs 0"    # a CPU-sized try

Returns, both sums of mjlab's rewards (which mjlab multiplies by the control step): PQL's is
charts/episodic_return, the mean return of the episodes that ended in each log interval, with its
exploration noise, against env steps / charts/SPS; PPO's is rsl_rl's "Mean reward", the mean return
of its last 100 episodes with its Gaussian policy, against the sum of its iteration times, read
from what mjlab's script prints each iteration. mjlab's script starts its envs at random points of
their episodes (rsl_rl's init_at_random_ep_len), so its first returns are of partial episodes.
"""
import argparse
import datetime
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from solve_times import read_scalars  # noqa: E402

MINUTES = (1, 2, 5, 10, 20, 30, 60)  # columns of the table, up to the budget
PPO_LINE = re.compile(r"^\s*(Total steps|Mean reward|Iteration time):\s+([-0-9.e+]+)")


def pql_curve(folder, command):
    """Trains pql.py in folder (unless finished there); returns [(training seconds, env steps, return)],
    env steps/s and env steps in all."""
    if not os.path.isfile(os.path.join(folder, "finished.json")):
        for stale in glob.glob(os.path.join(folder, "runs", "*")):  # an unfinished attempt
            shutil.rmtree(stale)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "train.log"), "w") as log:
            code = subprocess.run(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
        if code != 0:
            sys.exit(f"pql.py failed with code {code}: see {os.path.join(folder, 'train.log')}")
        write_finished(folder, command)
    (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
    returns = read_scalars(run_dir, "charts/episodic_return")
    sps = read_scalars(run_dir, "charts/SPS")
    sps_at = dict(sps)
    points = [(step / sps_at[step], step, value) for step, value in returns]
    return points, (sps[-1][1] if sps else float("nan")), (sps[-1][0] if sps else 0)


def ppo_curve(folder, command, budget, env):
    """Runs mjlab's training script in folder (unless finished there) until it has trained budget
    seconds, reading the return and the time from what it prints; returns the same as pql_curve."""
    points_path = os.path.join(folder, "points.json")
    if not os.path.isfile(os.path.join(folder, "finished.json")):
        os.makedirs(folder, exist_ok=True)
        points, seconds, steps, reward = [], 0.0, 0, None
        deadline = time.time() + 2 * budget + 1800  # start-up and Warp's compiling included; a run that prints no progress
        with open(os.path.join(folder, "train.log"), "w") as log:
            process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in process.stdout:
                log.write(line)
                if time.time() > deadline:
                    process.kill()
                    break
                match = PPO_LINE.match(line)
                if not match:
                    continue
                key, value = match.group(1), float(match.group(2))
                if key == "Total steps":
                    steps, reward = int(value), None
                elif key == "Mean reward":
                    reward = value
                else:  # "Iteration time", the last of an iteration's lines
                    seconds += value
                    if reward is not None:
                        points.append((seconds, steps, reward))
                    if seconds >= budget:
                        process.send_signal(signal.SIGINT)
                        break
            process.stdout.close()  # what it prints while it stops goes nowhere, rather than into a full pipe
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if seconds < budget:
            sys.exit(f"mjlab's training script stopped after {seconds:.0f} s of training of {budget:g}"
                     f" (code {process.returncode}): see {os.path.join(folder, 'train.log')}")
        with open(points_path, "w") as f:
            json.dump(points, f)
        write_finished(folder, command)
    with open(points_path) as f:
        points = [tuple(p) for p in json.load(f)]
    return points, (points[-1][1] / points[-1][0] if points else float("nan")), (points[-1][1] if points else 0)


def write_finished(folder, command):
    with open(os.path.join(folder, "finished.json"), "w") as f:
        json.dump(dict(command=" ".join(command[1:]).replace(REPO + "/", ""), date=str(datetime.date.today())), f)


def run_date(folder):
    with open(os.path.join(folder, "finished.json")) as f:
        return json.load(f)["date"]


def return_at(points, seconds):
    """The last return logged at or before this many training seconds, or None."""
    earlier = [value for t, _, value in points if t <= seconds]
    return earlier[-1] if earlier else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="Mjlab-Velocity-Flat-Unitree-Go1", help="an mjlab task id (without 'mjlab:')")
    parser.add_argument("--device", default="cuda", help="cuda or cpu (mjlab's script takes the first visible GPU)")
    parser.add_argument("--num-envs", type=int, default=4096, help="envs of both methods (mjlab's PPO uses 4096 for Go1)")
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pql-flags", default="", help="more flags for pql.py, one string")
    parser.add_argument("--logdir", default=os.path.join(HERE, "logs", "mjlab_ppo"))
    parser.add_argument("--out", default=os.path.join(REPO, "docs"), help="where the figure goes")
    args = parser.parse_args()
    if args.budget <= 0 or args.num_envs < 1:
        parser.error(f"--budget must be > 0 and --num-envs >= 1, got {args.budget:g} and {args.num_envs}")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    try:
        import mjlab.tasks  # noqa: F401  (registers the tasks)
        from mjlab.tasks.registry import list_tasks
    except ImportError:
        sys.exit("mjlab is not installed: pip install -r requirements-mjlab.txt")
    if args.task not in list_tasks():
        parser.error(f"--task {args.task}: not an mjlab task; they are {', '.join(sorted(list_tasks()))}")

    folder = os.path.join(args.logdir, f"{args.task}_{args.device}_{args.num_envs}envs_{args.budget:g}s_seed{args.seed}")
    pql_command = [sys.executable, os.path.join(REPO, "pql.py"), "--task", f"mjlab:{args.task}", "--device", args.device,
                   "--seed", str(args.seed), "--num-envs", str(args.num_envs), "--max-time", str(args.budget),
                   "--total-timesteps", str(10**12), "--exp-name", "pql", *shlex.split(args.pql_flags)]
    ppo_command = [sys.executable, "-m", "mjlab.scripts.train", args.task, "--env.scene.num-envs", str(args.num_envs),
                   "--agent.seed", str(args.seed), "--agent.max-iterations", str(10**7), "--agent.logger", "tensorboard",
                   "--log-root", "logs"]
    # mjlab's script picks its device from CUDA_VISIBLE_DEVICES (empty: the CPU); unbuffered, so that
    # each iteration's lines arrive as they are printed.
    ppo_env = dict(os.environ, PYTHONUNBUFFERED="1", **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}))
    curves = {"pql.py": pql_curve(os.path.join(folder, "pql"), pql_command),
              "PPO (mjlab's settings)": ppo_curve(os.path.join(folder, "ppo"), ppo_command, args.budget, ppo_env)}

    import torch
    from bench_envs import machine_name
    machine = machine_name(torch.device(args.device))
    dates = " and ".join(sorted({run_date(os.path.join(folder, method)) for method in ("pql", "ppo")}))  # of the runs, which may be resumed ones
    minutes = [m for m in MINUTES if m * 60 <= args.budget]
    print(f"mjlab:{args.task}, {args.num_envs} envs, seed {args.seed}, {args.budget:g} s of training each; {machine}, {dates}\n")
    columns = ["method", *(f"return after {m} min" for m in minutes), "final return", "env steps", "env steps/s"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for name, (points, sps, steps) in curves.items():
        returns = [return_at(points, m * 60) for m in minutes] + [points[-1][2] if points else None]
        print(f"| {name} | " + " | ".join("-" if r is None else f"{r:.2f}" for r in returns) + f" | {steps:,} | {sps:,.0f} |")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (points, _, _) in curves.items():
        ax.plot([t / 60 for t, _, _ in points], [v for _, _, v in points], ".-", label=name)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("mean training return")
    ax.set_title(f"mjlab:{args.task}, {args.num_envs} envs, seed {args.seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, f"{machine}; {dates}", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"mjlab_{args.task}.png")
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
