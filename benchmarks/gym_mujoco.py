"""PQL on Gymnasium's MuJoCo tasks, side by side with PPO and with published TD3, SAC and PPO returns.

Trains pql.py, pql_threaded.py (each with its settings for the task, pql.TASK_DEFAULTS) and PPO from
rsl_rl (benchmarks/ppo.py, with PPO_FLAGS) on gym:HalfCheetah-v5 and gym:Hopper-v5, every seed with
the same wall-clock budget (--budget, training seconds), each run a Ray task that reserves the
machine's cores (benchmarks/grid.py: one run at a time here, many at once on a cluster). Each
finished run's curves (return against env steps and training seconds), command, commit, package
versions, machine and date are appended to benchmarks/results/gym_mujoco.jsonl (commit it to keep
them); runs already there are skipped, so the grid can be finished over several sittings. The
methods of a task and seed run back to back, and each run records the machine's speed just before
and after it (--probe): a shared machine's speed can move 2x within a day. Then it
prints a Markdown table and draws docs/mujoco_{task}.png (return against env steps and against
training seconds, the published returns marked). The TensorBoard logs stay under --logdir.

Returns: PQL's is its deterministic policy's, on evaluation envs of its own (eval/episodic_return,
no exploration noise), with the training return (exploration noise up to std 0.8) beside it;
PPO's is its training return (its Gaussian policy, as rsl_rl and CleanRL report it). "At 100k"
is the last return logged at or before 100,000 env steps, averaged over the seeds that got there.
After training, each run's final policy is also run without noise on 10 fresh envs, the same way for
both methods (PQL: `pql.py --eval-checkpoint`; PPO: its mean action, by ppo.py): the fair answer to
"which is better after the same wall-clock", since PPO's learned std ends at 0.67 to 0.85 on these tasks.

    python benchmarks/gym_mujoco.py                          # 2 tasks x 3 methods x 2 seeds, 30 min each: about 6 hours on 2 cores
    python benchmarks/gym_mujoco.py --tasks gym:Hopper-v5 --methods pql --seeds 1   # one run; later commands add to the same results
    python benchmarks/gym_mujoco.py --no-run                 # only the table and the figures, from the results file
    python benchmarks/gym_mujoco.py --speed                  # pql.py's env steps/s with the candidate settings (SPEED_CANDIDATES)
    python benchmarks/gym_mujoco.py --probe                  # how fast this machine is now: MuJoCo steps/s, MLP updates/s
    python benchmarks/gym_mujoco.py --device cuda --budget 900       # GPU learners; the table shows runs of this budget and device
    python benchmarks/gym_mujoco.py --address auto --cpus-per-run 4 --logdir /shared/logs/mujoco --results /shared/gym_mujoco.jsonl   # on a Ray cluster
"""
import argparse
import datetime
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import grid  # noqa: E402
from learning_curves import fmt, machine_description, mean  # noqa: E402
from seed_sweep import code_version  # noqa: E402
from solve_times import read_scalars  # noqa: E402

TASKS = ["gym:HalfCheetah-v5", "gym:Hopper-v5"]
# Method name (also the run's exp_name) -> its script and flags. PQL takes its settings for the task
# from pql.TASK_DEFAULTS. PPO keeps rsl_rl's usual settings (benchmarks/ppo.py) but for two: 64 envs
# (64 x 24 = 1,536 samples per update, near the 2,048 of CleanRL's PPO for MuJoCo; more envs do not
# step faster here, MuJoCo's physics sets the pace) and TD3's networks, like PQL's.
PPO_FLAGS = ["--num-envs", "64", "--hidden-dims", "256", "256"]
METHODS = {"pql": ["pql.py"], "pql_threaded": ["pql_threaded.py"], "ppo": ["benchmarks/ppo.py", *PPO_FLAGS]}
LABELS = {"pql": "pql.py", "pql_threaded": "pql_threaded.py", "ppo": "PPO (rsl_rl)"}
COLORS = {"pql": "tab:blue", "pql_threaded": "tab:green", "ppo": "tab:red"}
# Training seconds per run: 30 minutes, in which pql.py should get past 200,000 env steps on a 2-core
# CPU (22 to 26 minutes there by `--speed`, which runs no evaluation envs), so that the table has its
# return at 200k; a run that ends short of a milestone is left out of that cell, which says so.
DEFAULT_BUDGET = 1800.0
MILESTONES = (100_000, 200_000)  # env steps at which the table compares returns
# "At the end" is one logged value, as noisy as the episodes that ended just then (PPO logs a few
# episodes per rollout); the table also gives the mean of every value logged in the last tenth of a
# run's training time, the fairer figure for "which is better at equal wall-clock".
LAST_PART = 0.1
# Last, each run's final policy without noise, on fresh envs after training (outside its budget), the
# same way for both methods: PQL's checkpoint through `pql.py --eval-checkpoint`, PPO's mean action
# through ppo.py's own evaluation (PPO's training return samples with a std that ends at 0.67 to 0.85).
FINAL_EVAL_EPISODES = 10
# This machine's speed moved 2x within a day, so each run also records how fast the machine was just
# before and just after it (machine_speed, PROBE_SECONDS on each kind of work), and the methods of a
# task and seed run back to back: runs are compared at nearly the same speed, or their probes say not.
PROBE_SECONDS = 5.0

# Published returns on the same tasks (older versions of them), to hold ours against. Each: algorithm
# -> {env steps: (mean, std over seeds)}, with where the numbers come from and how they were measured.
# None of them is on the v5 tasks; v1 to v4 have the same observations, actions and reward terms.
PUBLISHED = {
    "gym:HalfCheetah-v5": {
        "TD3, paper (v1)": {100_000: (5514, 554), 200_000: (6833, 683), 1_000_000: (9567, 833)},
        "TD3, Tianshou (v3)": {100_000: (5336, 376), 200_000: (6721, 617), 1_000_000: (10127, 692)},
        "SAC, Tianshou (v3)": {100_000: (6515, 514), 200_000: (8208, 928), 1_000_000: (12122, 1006)},
        "PPO, Tianshou (v3)": {100_000: (1027, 342), 200_000: (2704, 737), 1_013_760: (5650, 1226)},
    },
    "gym:Hopper-v5": {
        "TD3, paper (v1)": {100_000: (659, 752), 200_000: (2441, 746), 1_000_000: (3391, 378)},
        "TD3, Tianshou (v3)": {100_000: (597, 288), 200_000: (887, 649), 1_000_000: (3133, 772)},
        "SAC, Tianshou (v3)": {100_000: (2613, 991), 200_000: (3234, 314), 1_000_000: (3532, 43)},
        "PPO, Tianshou (v3)": {100_000: (377, 44), 200_000: (528, 128), 1_013_760: (2483, 852)},
    },
}
PUBLISHED_SOURCES = [
    ("TD3, paper: the TD3 paper's own curves (Fujimoto et al. 2018), sfujim/TD3 at 34770cc, learning_curves/{HalfCheetah,Hopper}/"
     "TD3_*-v1_<seed>.npy: 10 seeds, the deterministic policy over 10 episodes every 5,000 steps; 10,000 (HalfCheetah) and"
     " 1,000 (Hopper) random steps first."),
    ("Tianshou: thu-ml/tianshou at 39acf20, examples/mujoco/benchmark/{HalfCheetah,Hopper}-v3/{td3,sac,ppo}/test_rew_10seeds.csv:"
     " 10 seeds; TD3 and SAC evaluated without noise every 5,000 steps; PPO's test return samples its actions and is logged"
     " every 30,720 steps, so its 100k and 200k values are interpolated between the rows around them."),
    ("Mean ± std over seeds (population std). CleanRL reports only final training returns at 1M steps (v4, 3 seeds;"
     " vwxyzjn/cleanrl at fe8d8a0, docs/rl-algorithms/td3.md, docs/benchmark/ppo_continuous_action.md): TD3 9583 ± 126"
     " (HalfCheetah) and 3135 ± 360 (Hopper), PPO 1443 ± 46 and 2383 ± 272."),
]


# The settings timed by --speed, as flags on top of the task's TASK_DEFAULTS: how many env steps/s
# each number of envs, batch and network size gives, once the warm-up is over (docs/environments.md).
SPEED_CANDIDATES = ["--num-envs 8", "--num-envs 8 --batch-size 128", "--num-envs 16", "--num-envs 16 --batch-size 128", "--num-envs 32"]


def command_for(method, task, seed, device, budget):
    script, *flags = METHODS[method]
    return [sys.executable, os.path.join(REPO, script), "--task", task, "--seed", str(seed), "--device", device,
            "--max-time", str(budget), "--total-timesteps", str(10**10), "--exp-name", method, *flags]


def run_key(task, method, seed, budget, device):
    return f"{task}__{method}__{seed}__{budget:g}s__{device}"


def curve(run_dir, tag):
    """[(env steps, training seconds, value)] of one run's logged `tag`; seconds from charts/SPS (env
    steps over training seconds) at that step, or the last SPS logged before it."""
    sps = read_scalars(run_dir, "charts/SPS")
    points = []
    for step, value in read_scalars(run_dir, tag):
        earlier = [rate for logged, rate in sps if logged <= step]
        points.append((step, step / earlier[-1] if earlier else float("nan"), value))
    return points


def result_line(run_dir, method, task, seed, budget, device, command, commit, machine):
    """What the results file keeps of a finished run: its curves, how far and how fast it got."""
    sps = read_scalars(run_dir, "charts/SPS")
    return {
        "task": task, "method": method, "seed": seed, "budget": budget, "device": device, "command": command,
        # PQL: its deterministic policy on evaluation envs of its own; PPO: its training return.
        "returns": curve(run_dir, "charts/episodic_return" if method == "ppo" else "eval/episodic_return"),
        "training_returns": curve(run_dir, "charts/episodic_return"),
        "env_steps": sps[-1][0] if sps else 0, "env_steps_per_s": sps[-1][1] if sps else None,
        "date": str(datetime.date.today()), "machine": machine, "commit": commit,
    }


def package_versions():
    """The versions of the packages that set a run's physics and learning (MuJoCo's physics can change
    between releases; rsl_rl 5.5 changed when PPO's normaliser updates): each result line keeps them."""
    from importlib import metadata
    versions = {}
    for name in ("torch", "gymnasium", "mujoco", "rsl-rl-lib"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def final_policy_return(method, run_dir, seed, device):
    """The mean return of the run's final policy without exploration noise, over FINAL_EVAL_EPISODES
    fresh envs (seeded seed + 10,000), or None if the run left no such policy (a PPO run logged before
    ppo.py evaluated its final policy). PPO's was measured by ppo.py at the end of training."""
    if method == "ppo":
        logged = read_scalars(run_dir, "eval/episodic_return")
        return logged[-1][1] if logged else None
    checkpoint = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(checkpoint):
        return None
    command = [sys.executable, os.path.join(REPO, "pql.py"), "--eval-checkpoint", checkpoint, "--eval-episodes",
               str(FINAL_EVAL_EPISODES), "--seed", str(seed + 10_000), "--device", device]
    result = subprocess.run(command, capture_output=True, text=True)
    found = re.search(r"mean return (-?[0-9.]+) ", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    return float(found.group(1))


def machine_speed(seconds=PROBE_SECONDS):
    """How fast this machine's CPU is now at the two kinds of work these runs do, `seconds` on each,
    with torch's default threads (on the CPU, also for --device cuda runs): MuJoCo's physics (HalfCheetah-v5 stepped with fixed random actions,
    steps/s) and the learners' updates (a 256-256 MLP at batch 256 with Adam, updates/s)."""
    import gymnasium as gym
    import numpy as np
    import torch

    env = gym.make("HalfCheetah-v5")
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (1000, env.action_space.shape[0])).astype(np.float32)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=0)
        for action in actions:  # one episode: HalfCheetah never falls, its time limit is 1,000 steps
            env.step(action)
        steps += len(actions)
    physics = steps / (time.perf_counter() - start)
    env.close()
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(23, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                  torch.nn.Linear(256, 1))
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
    inputs, targets = torch.randn(256, 23), torch.randn(256, 1)
    updates, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = (network(inputs) - targets).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        updates += 1
    return {"mujoco_steps_per_s": physics, "mlp_updates_per_s": updates / (time.perf_counter() - start)}


def probe_machine():
    """machine_speed() in a process of its own, as the runs are (`gym_mujoco.py --probe`)."""
    result = grid.run_process([sys.executable, os.path.abspath(__file__), "--probe"], cwd=HERE)
    if result.returncode != 0:
        raise RuntimeError(f"gym_mujoco.py --probe failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train(method, task, seed, device, budget, logdir):
    """One training run in a subprocess, in logdir/{budget}s_{device}/runs; returns its result line.
    Runs as a Ray task (benchmarks/grid.py); a folder left by an unfinished attempt is removed first."""
    folder = os.path.join(logdir, f"{budget:g}s_{device}")
    os.makedirs(folder, exist_ok=True)
    pattern = os.path.join(folder, "runs", f"{task.replace(':', '-')}__{method}__{seed}__*")
    for stale in glob.glob(pattern):
        shutil.rmtree(stale)
    command = command_for(method, task, seed, device, budget)
    commit, machine, packages = code_version(), machine_description(device), package_versions()  # the code it starts with
    speed_before = probe_machine()
    result = grid.run_process(command, cwd=folder)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with code {result.returncode}:\n{result.stderr[-3000:]}")
    speed_after = probe_machine()
    (run_dir,) = glob.glob(pattern)
    line = result_line(run_dir, method, task, seed, budget, device, " ".join(command[1:]).replace(REPO + "/", ""), commit, machine)
    return dict(line, packages=packages, machine_speed=[speed_before, speed_after],
                final_return=final_policy_return(method, run_dir, seed, device))


def grid_jobs(tasks, methods, seeds, budget, device, logdir, done):
    """The runs not yet done, as grid.run_grid takes them, in the order they start: seed by seed, task
    by task, the methods of each back to back, so the runs compared in the table are close in time."""
    return [(run_key(task, method, seed, budget, device), train, (method, task, seed, device, budget, logdir))
            for seed in seeds for task in tasks for method in methods
            if run_key(task, method, seed, budget, device) not in done]


def print_machine_speeds(results):
    """Each run's probes (machine_speed) just before and just after it, one line per run."""
    probed = [r for r in results if "machine_speed" in r]
    if not probed:
        return
    print("\nThe machine's speed just before and just after each run (MuJoCo steps/s; 256-256 MLP updates/s):")
    for r in probed:
        before, after = r["machine_speed"]
        print(f"- {r['date']} {r['task']} {LABELS[r['method']]} seed {r['seed']}: {before['mujoco_steps_per_s']:,.0f} and"
              f" {after['mujoco_steps_per_s']:,.0f}; {before['mlp_updates_per_s']:,.0f} and {after['mlp_updates_per_s']:,.0f}")
    if len(probed) < len(results):
        print(f"  ({len(results) - len(probed)} run(s) logged before the machine's speed was kept)")


def runs_done(results, logdir, results_path):
    """The keys of the finished runs among `results`. A PQL run logged before final policies were
    evaluated gets that evaluation now, from its checkpoint under logdir (the completed line is
    appended to results_path); a PPO run logged before ppo.py evaluated its final policy left none
    to evaluate, so it is not done: it runs again, and its new line takes the old one's place."""
    done = set()
    for r in results:
        if "final_return" not in r and r["method"] != "ppo":
            folder = os.path.join(logdir, f"{r['budget']:g}s_{r['device']}", "runs")
            found = sorted(glob.glob(os.path.join(folder, f"{r['task'].replace(':', '-')}__{r['method']}__{r['seed']}__*")))
            if found and os.path.isfile(os.path.join(found[-1], "model.pt")):
                r = dict(r, final_return=final_policy_return(r["method"], found[-1], r["seed"], r["device"]))
                with open(results_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
        if "final_return" in r:
            done.add(run_key(r["task"], r["method"], r["seed"], r["budget"], r["device"]))
    return done


def value_at(run, name, step):
    """The run's last `name` value logged at or before env step `step`, or None if the run ended
    before that step (or logged none by then)."""
    if run["env_steps"] < step:
        return None
    before = [value for logged, _, value in run[name] if logged <= step]
    return before[-1] if before else None


def mean_of_last_part(run, name):
    """The mean of the run's `name` values logged in the last LAST_PART of its training seconds, or
    None if it logged none then."""
    seconds = run["env_steps"] / run["env_steps_per_s"] if run["env_steps_per_s"] else float("nan")
    values = [value for _, at_seconds, value in run[name] if at_seconds >= (1 - LAST_PART) * seconds]
    return mean(values) if values else None


def summarize(results, tasks, methods):
    """Per (task, method): runs, mean returns at the milestones and at the end, env steps, SPS, seconds."""
    rows = {}
    for task in tasks:
        for method in methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            row = {"runs": len(runs)}
            for name in ("returns", "training_returns"):
                for milestone in MILESTONES:
                    values = [v for v in (value_at(r, name, milestone) for r in runs) if v is not None]
                    row[name, milestone], row["count", milestone] = mean(values), len(values)
                row[name, "end"] = mean([r[name][-1][2] for r in runs if r[name]])
                row[name, "last part"] = mean([v for v in (mean_of_last_part(r, name) for r in runs) if v is not None])
            finals = [r["final_return"] for r in runs if r.get("final_return") is not None]
            row["final"], row["count", "final"] = mean(finals), len(finals)
            row["steps"] = mean([r["env_steps"] for r in runs])
            row["sps"] = mean([r["env_steps_per_s"] for r in runs if r["env_steps_per_s"]])
            row["seconds"] = mean([r["env_steps"] / r["env_steps_per_s"] for r in runs if r["env_steps_per_s"]])
            rows[task, method] = row
    return rows


def print_table(rows, tasks, methods, header):
    print(header + "\n")
    print(f"| task | method | runs | return at 100k | at 200k | at the end | mean over the last {LAST_PART:.0%} of the time |"
          " final policy, no noise | env steps at the end | env steps/s | training s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        for method in methods:
            r = rows[task, method]
            if r["runs"] == 0:
                continue
            cells = []
            for key in (*MILESTONES, "end", "last part"):
                cell = fmt(r["returns", key], ".0f")
                if method != "ppo":
                    cell += f" ({fmt(r['training_returns', key], '.0f')})"
                if key in MILESTONES and 0 < r["count", key] < r["runs"]:
                    cell += f" [{r['count', key]} of {r['runs']} runs]"  # the others ended before this step
                cells.append(cell)
            final = fmt(r["final"], ".0f")
            cells.append(final + (f" [{r['count', 'final']} of {r['runs']} runs]" if 0 < r["count", "final"] < r["runs"] else ""))
            print(f"| {task} | {LABELS[method]} | {r['runs']} | " + " | ".join(cells) +
                  f" | {fmt(r['steps'], ',.0f')} | {fmt(r['sps'], ',.0f')} | {fmt(r['seconds'], '.0f')} |")
        for algorithm, returns in PUBLISHED.get(task, {}).items():
            cells = [f"{returns[key][0]:.0f} ± {returns[key][1]:.0f}" if key in returns else "-" for key in MILESTONES]
            final = max(returns)
            print(f"| {task} | {algorithm} | | " + " | ".join(cells) +
                  f" | {returns[final][0]:.0f} ± {returns[final][1]:.0f} | | | {final:,} | | |")
    print("\nReturns are means over the runs (PQL: its deterministic policy, with the training return in"
          " brackets; PPO: its training return), each the last logged at or before that env step, and the mean of"
          f" all those logged in the last {LAST_PART:.0%} of each run's training seconds; the final policy without"
          f" exploration noise (PPO: its mean action) on {FINAL_EVAL_EPISODES} fresh envs after training; env steps/s"
          " over the whole run, warm-up and evaluation envs included; published rows: mean ± std over their seeds.")
    for source in PUBLISHED_SOURCES:
        print(f"- {source}")


def plot(results, tasks, methods, footer_text, out):
    """mujoco_{task}.png in `out`: return against env steps (log scale) and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plots import draw_seeds

    written = []
    for task in tasks:
        fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
        shown = []  # the methods with runs of this task, for the title
        for method in methods:
            data = [r["returns"] for r in results if r["task"] == task and r["method"] == method and r["returns"]]
            if not data:
                continue
            shown.append(LABELS[method])
            label = f"{LABELS[method]} ({len(data)} seed{'s' if len(data) > 1 else ''})"
            for ax, column, log_x in ((ax_steps, 0, True), (ax_time, 1, False)):
                draw_seeds(ax, [[point[column] for point in points] for points in data], [[point[2] for point in points] for points in data],
                           COLORS[method], label, log_x, markersize=2, alpha=0.5)
        for (algorithm, returns), marker in zip(PUBLISHED.get(task, {}).items(), "sD^v"):
            steps = sorted(returns)
            ax_steps.errorbar(steps, [returns[s][0] for s in steps], yerr=[returns[s][1] for s in steps], fmt=marker,
                              color="black", markersize=4, capsize=3, alpha=0.7, label=f"{algorithm}, published")
        for ax, xlabel in ((ax_steps, "env steps"), (ax_time, "training seconds")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("return (PQL: its deterministic policy)")
            ax.grid(alpha=0.3)
        ax_steps.set_xscale("log")
        ax_steps.legend(fontsize=6, loc="upper left")
        ax_time.legend(fontsize=7, loc="upper left")
        # Two lines: on one, the title ran past both edges of the 11-inch figure.
        fig.suptitle(f"{task}: {', '.join(shown)}, the same training seconds per run\n(line and band: mean and min-max over seeds)")
        fig.text(0.01, 0.01, footer_text, fontsize=7, color="gray")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out, f"mujoco_{task.split(':')[-1].split('-')[0]}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def speed(task, candidates, device, seconds=45.0):
    """pql.py's env steps/s with each candidate's flags, one run at a time in this process's turn:
    a short run (100 warm-up iterations, then learning), timed between a third of the way and its
    end from charts/SPS (env steps over training seconds), so the warm-up's random steps are left out."""
    import tempfile

    sys.path.insert(0, REPO)
    import pql

    print(f"pql.py on {task}, {machine_description(device)}; env steps/s once learning runs, {seconds:g} s per setting\n")
    print("| flags on top of the task's defaults | V-updates per env step | transitions the V-learner samples per env step | env steps/s | minutes to 200k env steps |")
    print("|---|---|---|---|---|")
    for flags in candidates:
        settings = pql.parse_args(["--task", task, *flags.split()])
        with tempfile.TemporaryDirectory() as folder:
            command = [sys.executable, os.path.join(REPO, "pql.py"), "--task", task, "--device", device, "--warmup-iterations", "100",
                       "--total-timesteps", str(10**9), "--max-time", str(seconds), "--log-interval", "20", "--eval-envs", "0",
                       *flags.split()]
            result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            (run_dir,) = glob.glob(os.path.join(folder, "runs", "*"))
            sps = read_scalars(run_dir, "charts/SPS")
        (step0, sps0), (step1, sps1) = sps[len(sps) // 3], sps[-1]
        rate = (step1 - step0) / (step1 / sps1 - step0 / sps0)
        updates = settings.v_updates_per_env_step / settings.num_envs
        print(f"| `{flags}` | {updates:.2f} | {updates * settings.batch_size:.0f} | {rate:.0f} | {200_000 / rate / 60:.0f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="training seconds per run (default: 30 minutes)")
    parser.add_argument("--device", default="cpu", help="device of the learners (the MuJoCo physics runs on the CPU)")
    parser.add_argument("--results", default=os.path.join(HERE, "results", "gym_mujoco.jsonl"),
                        help="one JSON line per finished run (its curves); runs already in it are skipped")
    parser.add_argument("--logdir", default=os.path.join(HERE, "logs", "mujoco"), help="where the runs' TensorBoard logs go (under runs/)")
    parser.add_argument("--figures", default=os.path.join(REPO, "docs"), help="folder for mujoco_{task}.png; '' draws none")
    parser.add_argument("--no-run", action="store_true", help="print the table and draw the figures from the results file only")
    parser.add_argument("--speed", action="store_true", help="only time pql.py with each of SPEED_CANDIDATES on --tasks, one run at a time")
    parser.add_argument("--probe", action="store_true", help="only time this machine now, as each run does just before and after it:"
                        " MuJoCo steps/s and MLP updates/s, printed as one JSON line")
    grid.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    try:  # a device that cannot name a machine would fail only after the first run
        machine_description(args.device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device!r} is not a device here ({error}); use cpu, or cuda or cuda:N on a machine with a GPU")
    if args.probe:
        print(json.dumps(machine_speed()))
        return
    if args.speed:
        for task in args.tasks:
            speed(task, SPEED_CANDIDATES, args.device)
        return

    def read_results():
        """The results file's runs, one per key (the latest); a line that does not parse (a write cut
        short) is skipped with a warning."""
        runs = {}
        if os.path.isfile(args.results):
            with open(args.results) as f:
                for number, line in enumerate(f, 1):
                    try:
                        r = json.loads(line)
                    except ValueError:
                        print(f"warning: {args.results}:{number} is not a result line; skipped", file=sys.stderr)
                        continue
                    runs[run_key(r["task"], r["method"], r["seed"], r["budget"], r["device"])] = r
        return list(runs.values())

    if not args.no_run:
        logdir = os.path.abspath(args.logdir)
        os.makedirs(logdir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        done = runs_done(read_results(), logdir, args.results)
        jobs = grid_jobs(args.tasks, args.methods, args.seeds, args.budget, args.device, logdir, done)

        def record(key, result):  # in this process, as each run ends: the results file has one writer
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
            r = summarize([result], [result["task"]], [result["method"]])[result["task"], result["method"]]
            print(f"# {result['task']} {LABELS[result['method']]} seed {result['seed']}: return {fmt(r['returns', 'end'], '.0f')}"
                  f" after {fmt(r['steps'], ',.0f')} env steps ({fmt(r['sps'], ',.0f')} env steps/s)", flush=True)

        grid.run_grid(jobs, args.address, args.cpus_per_run, args.gpus_per_run, args.device, on_done=record)

    # The table and the figures show the runs of this --budget and --device.
    results = [r for r in read_results() if r["budget"] == args.budget and r["device"] == args.device]
    if not results:
        parser.error(f"no runs of {args.budget:g} s on {args.device} in {args.results} (run without --no-run first)")
    tasks = [t for t in TASKS if any(r["task"] == t for r in results)]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    dates = sorted({r["date"] for r in results})
    machines = sorted({r["machine"] for r in results})
    commits = sorted({str(r["commit"]) for r in results})
    packages = sorted({", ".join(f"{name} {version}" for name, version in r["packages"].items()) for r in results if "packages" in r})
    if len(machines) > 1 or len(commits) > 1 or len(packages) > 1:
        print(f"note: these runs come from {len(machines)} machine(s), {len(commits)} commit(s) and {len(packages)} set(s) of"
              f" package versions: {'; '.join(machines + commits + packages)}")
    seeds = sorted({r["seed"] for r in results})
    about = (f"{'; '.join(machines)}, device {args.device}; {dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''};"
             f" {args.budget:g} training s per run; seeds {' '.join(map(str, seeds))}")
    print()
    print_table(summarize(results, tasks, methods), tasks, methods, "Machine: " + about)
    if packages:
        unknown = sum("packages" not in r for r in results)
        print(f"\nPackages: {'; '.join(packages)}" + (f" ({unknown} run(s) logged before versions were kept)" if unknown else ""))
    print_machine_speeds(results)
    print("\nCommands (each run's own, in its log folder):")
    for command in sorted({r["command"] for r in results}):
        print(f"    python {command}")
    if args.figures:
        for path in plot(results, tasks, methods, about, args.figures):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
