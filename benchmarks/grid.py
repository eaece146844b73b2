"""Run the runs of a benchmark grid as Ray tasks: on this machine, or unchanged on a cluster.

Each run of a grid (a task x method x seed, say) becomes one Ray task, which starts the training
script as a process of its own and reserves the cores (and GPUs) that run needs; Ray starts a run
only where its reservation fits, so runs never compete for cores:

  * On one machine (the default, no --address) Ray starts a private instance with this machine's
    cores, and each run reserves all of them (--cpus-per-run defaults to the core count), so runs
    go one at a time, as timings need: two torch processes on the same two cores slow each other
    down by far more than 2x. With more cores, `--cpus-per-run 4` on a 16-core machine runs 4 at once.
  * On a cluster started with `ray start --head` on one node and `ray start --address <head>:6379`
    on the others, pass `--address auto` on the head node (or any node of the cluster). Each run
    reserves --cpus-per-run cores and --gpus-per-run GPUs (1 with --device cuda), and as many run at
    once as the cluster has room for. The repository and the log folder must be at the same path on
    every node (a shared filesystem), since each run writes its logs where the script says.

Results come back to the driver as each run ends, so a grid's own bookkeeping (a results file, a
folder per run) is written by one process and a grid that stops part-way resumes where it was.
"""
import os
import sys

INSTALL = "pip install -r benchmarks/requirements.txt  # adds ray; keeps the torch pinned in requirements.txt"


def add_arguments(parser):
    """The grid flags, for the argparse-based benchmark scripts."""
    parser.add_argument("--address", default=None, help="Ray cluster to run on (`auto`: the one this node belongs to); default: a private instance on this machine")
    parser.add_argument("--cpus-per-run", type=float, default=None, help="cores each run reserves; default: all of this machine's cores (runs go one at a time)")
    parser.add_argument("--gpus-per-run", type=float, default=None, help="GPUs each run reserves; default: 1 with --device cuda, else 0")


# Started in front of a run's command on Linux: asks the kernel to send the run SIGTERM when the Ray
# worker that started it dies, then becomes the run (exec). A process of its own, without threads,
# so this is safe where subprocess's preexec_fn is not (a Ray worker has threads).
_END_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM);"  # 1: PR_SET_PDEATHSIG
                    " os.getppid() == int(sys.argv[1]) or sys.exit(143); os.execv(sys.argv[2], sys.argv[2:])")


def run_process(command, cwd):
    """subprocess.run(command) with its output captured, whose process ends with the Ray worker that
    started it (on Linux): stopping a grid (Ctrl-C in the driver) leaves no training run behind."""
    import subprocess

    if sys.platform.startswith("linux"):
        command = [sys.executable, "-c", _END_WITH_PARENT, str(os.getpid()), *command]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def run_grid(jobs, address=None, cpus_per_run=None, gpus_per_run=None, device="cpu", on_done=None):
    """Run `function(*arguments)` for each (key, function, arguments) in `jobs` as a Ray task.

    Calls `on_done(key, result)` in this process as each run ends (in the order they end) and returns
    {key: result}. An exception in a run stops the grid and is raised here with the run's traceback.
    """
    if not jobs:
        return {}
    try:
        import ray
    except ImportError:
        sys.exit(f"error: the benchmark grids run on Ray, which is not installed: {INSTALL}")
    cpus = cpus_per_run if cpus_per_run is not None else float(os.cpu_count() or 1)
    gpus = gpus_per_run if gpus_per_run is not None else (1.0 if str(device).startswith("cuda") else 0.0)
    started_here = not ray.is_initialized()
    if started_here:
        # Without --address (or RAY_ADDRESS): a private instance with this machine's cores. The
        # runs' output comes back through their results, so the workers' logs stay out of the
        # terminal; the workers import the benchmark scripts' modules (this folder) by name.
        here = os.path.dirname(os.path.abspath(__file__))
        python_path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path}},
                 **({} if address or os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
    try:
        # A run that fits no node would wait forever: refuse it before any work, naming the flag.
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        for flag, need, resource in [("--cpus-per-run", cpus, "CPU"), ("--gpus-per-run", gpus, "GPU")]:
            most = max((node.get(resource, 0.0) for node in nodes), default=0.0)
            if need < 0 or need > most:
                sys.exit(f"error: {flag} {need:g}: each run needs that many {resource}s on one node, and the largest node"
                         f" of this Ray instance has {most:g} (allowed: 0 to {most:g}; --device cuda asks for 1 GPU)")
        remote = ray.remote(lambda function, arguments: function(*arguments))
        pending = {remote.options(num_cpus=cpus, num_gpus=gpus).remote(function, arguments): key for key, function, arguments in jobs}
        results = {}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready)
            results[key] = ray.get(ready)  # re-raises a run's exception, with its traceback
            if on_done is not None:
                on_done(key, results[key])
        return results
    finally:
        if started_here:
            ray.shutdown()


class Done:
    """The runs of a grid that have finished in a log folder: `done.json` there maps each finished
    run's name to what the driver keeps of it (its command, or its row of the table). Only the driver writes it (from `on_done`), replacing it atomically,
    so a grid stopped part-way (Ctrl-C, a lost node) resumes with the runs that finished."""

    def __init__(self, logdir):
        self.path = os.path.join(logdir, "done.json")
        self.runs = {}
        if os.path.exists(self.path):
            import json

            with open(self.path) as f:
                self.runs = json.load(f)

    def __contains__(self, name):
        return name in self.runs

    def add(self, name, command):
        import json

        self.runs[name] = command
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.runs, f, indent=1)
        os.replace(self.path + ".tmp", self.path)
