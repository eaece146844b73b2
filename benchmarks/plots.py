"""The figures of the README and docs/results.md, drawn from the logged runs of learning_curves.py and scaling.py.

    python benchmarks/plots.py            # reads benchmarks/logs/{learning,scaling}, writes docs/*.png

Writes, for each task found in the learning logs, docs/learning_{task}.png: every logged mean
training return (dots), and the mean over seeds (line) with its min-max (band) over the range all
seeds cover, against env steps (log scale: PPO uses far more) and against training seconds, one
colour per method, the solved score dashed. And
docs/scaling.png: env steps/s and V-updates/s against num_envs (log-log) for each script. Every
figure names the machine and the date of its runs.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import learning_curves  # noqa: E402
import scaling  # noqa: E402
from solve_times import TASKS, read_scalars  # noqa: E402

COLORS = {"pql": "tab:blue", "pql_threaded": "tab:green", "ppo": "tab:red"}


def curves(run_dir):
    """(env steps, training seconds, return) arrays of one run's logged returns."""
    returns = read_scalars(run_dir, "charts/episodic_return")
    sps = dict(read_scalars(run_dir, "charts/SPS"))
    steps = np.array([s for s, _ in returns], dtype=float)
    seconds = np.array([s / sps[s] for s, _ in returns], dtype=float)
    values = np.array([v for _, v in returns], dtype=float)
    return steps, seconds, values


def band(xs_per_seed, ys_per_seed, log_x):
    """Mean, min and max over seeds on a grid over the x range every seed covers, or None where
    that range is a single point or empty (a seed that logged one return, curves that do not
    overlap): a mean there would leave seeds out, so only the logged points are drawn."""
    low = max(x[0] for x in xs_per_seed)
    high = min(x[-1] for x in xs_per_seed)
    if high <= low:
        return None
    grid = np.geomspace(low, high, 200) if log_x else np.linspace(low, high, 200)
    stacked = np.stack([np.interp(grid, x, y) for x, y in zip(xs_per_seed, ys_per_seed)])
    return grid, stacked.mean(0), stacked.min(0), stacked.max(0)


def draw_seeds(ax, xs_per_seed, ys_per_seed, color, label, log_x, markersize=3, alpha=0.6):
    """Every logged point of every seed as a dot, and the mean over seeds (line) with its min-max
    (band) where all seeds overlap; with no common range, only the dots (said in the label)."""
    for x, y in zip(xs_per_seed, ys_per_seed):
        ax.plot(x, y, "o", color=color, markersize=markersize, alpha=alpha)
    summary = band([np.asarray(x) for x in xs_per_seed], [np.asarray(y) for y in ys_per_seed], log_x)
    if summary is None:
        ax.plot([], [], "o", color=color, label=label + ", dots only")
        return
    x, mean, low, high = summary
    ax.plot(x, mean, color=color, label=label)
    ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)


def footer(fig, manifest):
    fig.text(0.01, 0.01, f"{manifest['machine']}, device {manifest['device']}; {manifest['date']}", fontsize=7, color="gray")


def plot_learning(logdir, out):
    with open(os.path.join(logdir, "manifest.json")) as f:
        manifest = json.load(f)
    written = []
    for task in manifest["tasks"]:
        fig, (ax_steps, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
        for method in manifest["methods"]:
            runs = [learning_curves.run_dirs(logdir, task, method, seed) for seed in manifest["seeds"]]
            data = [curves(dirs[-1]) for dirs in runs if dirs]
            data = [d for d in data if len(d[0]) > 0]
            if not data:
                continue
            label = f"{learning_curves.LABELS[method]} ({len(data)} seed{'s' if len(data) > 1 else ''})"
            for ax, column, log_x in ((ax_steps, 0, True), (ax_time, 1, False)):
                # Every logged return as a dot: with few logged points (CartpoleSwingup logs one per
                # 64,000 env steps at 64 envs) the dots are the data, the line only summarises it.
                draw_seeds(ax, [d[column] for d in data], [d[2] for d in data], COLORS[method], label, log_x)
        for ax, xlabel in ((ax_steps, "env steps"), (ax_time, "training seconds")):
            ax.axhline(TASKS[task]["solved"], color="black", linestyle="--", linewidth=1, label="solved")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean training return")
            ax.grid(alpha=0.3)
        ax_steps.set_xscale("log")
        ax_time.legend(fontsize=8, loc="lower right")
        compared = " vs ".join(dict.fromkeys("PPO" if method == "ppo" else "PQL" for method in manifest["methods"]))
        fig.suptitle(f"{task}: {compared} (dots: logged returns; line and band: mean and min-max over seeds)")
        footer(fig, manifest)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out, f"learning_{task.replace(':', '_')}.png")  # mjlab:Mjlab-Cartpole-Balance: no ':' in a file name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_scaling(logdir, out):
    with open(os.path.join(logdir, "manifest.json")) as f:
        manifest = json.load(f)
    rows = scaling.collect(logdir)
    fig, (ax_env, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for script in scaling.SCRIPTS:
        mine = [r for r in rows if r["script"] == script]
        if not mine:
            continue
        n = [r["num_envs"] for r in mine]
        ax_env.plot(n, [r["env_steps_per_s"] for r in mine], "o-", label=script)
        ax_v.plot(n, [r["v_updates_per_s"] for r in mine], "o-", label=script)
    for ax, ylabel in ((ax_env, "env steps/s"), (ax_v, "V-updates/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("num_envs (batch = 64 sqrt(num_envs))")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Scaling of PQL ({manifest['task']}, networks {'-'.join(map(str, manifest['hidden_dims']))})")
    footer(fig, manifest)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = os.path.join(out, "scaling.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learning-logdir", default=learning_curves.DEFAULT_LOGDIR)
    parser.add_argument("--scaling-logdir", default=scaling.DEFAULT_LOGDIR)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "docs"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    written = []
    for logdir, plot in ((args.learning_logdir, plot_learning), (args.scaling_logdir, plot_scaling)):
        if os.path.isfile(os.path.join(logdir, "manifest.json")):
            written += plot(logdir, args.out)
        else:
            print(f"no runs in {logdir} (no manifest.json): skipped")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
