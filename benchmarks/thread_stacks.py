"""What each thread of a training run is doing, sampled: py-spy's stacks, sorted and counted.

    python benchmarks/thread_stacks.py --flags="--compile --bf16 --total-timesteps 12000000"   # on a GPU
    python benchmarks/thread_stacks.py --flags="--device cpu --num-envs 64 --hidden-dims 64 64 --batch-size 1024 --total-timesteps 30000"
    python benchmarks/thread_stacks.py --read stacks.txt          # sort a file py-spy wrote before

threaded_roles.py times pql_threaded.py's roles from inside and finds, under `--compile --bf16` on
a GPU, an actor that spends most of its loop on a CPU outside the calls it times, and ~200 context
switches per iteration in each thread. This script looks at that CPU time from outside: it starts
the script (--script, default pql_threaded.py) with --flags, waits until training starts (the
progress bar's first frame: compiling and recording CUDA graphs come before it), then lets py-spy
sample every thread's stack, Python and native frames, for --seconds, stops the run (SIGTERM: it
saves a checkpoint and exits; its runs/ folder is named thread_stacks), and sorts each sample by
its innermost frames into one of:

  * taking the GIL back: in a C++ call that waits on a libc lock or condition to retake the GIL (a
    torch call returning, or torch touching a Python object);
  * a Python lock or condition: threading's locks, events and conditions (a role waiting for
    another, the replay lock);
  * waiting for the GPU: in libcuda under a CUDA synchronize call;
  * CUDA driver, on a lock: in libcuda, waiting on a libc lock or condition (threads that launch
    into one CUDA context at once take turns on the driver's locks);
  * CUDA runtime or driver: any other time in libcuda (launches, copies, events);
  * torch's C++: libtorch and libc10 (on a GPU: dispatching kernels; on a CPU the kernels too);
  * Python: the interpreter, running the scripts' Python or its own work (garbage collection);
  * other: anything else (libc, OpenMP's thread pool, ...).

And, for each thread, the lines of the script where its samples were, innermost frame of the
script in each stack. py-spy is not a dependency of pql: `pip install py-spy` (a binary wheel; on a
machine without the internet, carry the wheel). It needs to read the training process's memory
(ptrace); as root, or with kernel.yama.ptrace_scope 0, that is allowed.
"""
import collections
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = ("taking the GIL back", "a Python lock or condition", "waiting for the GPU", "CUDA driver, on a lock",
              "CUDA runtime or driver", "torch's C++", "Python", "other")
LIBC_WAITS = re.compile(r"^(pthread_cond_(timed)?wait|pthread_mutex_lock|__lll_lock_wait|futex|sem_(timed)?wait|__futex)")
PYTHON_LOCKS = re.compile(r"PyThread_acquire_lock|lock_PyThread_acquire_lock|acquire_timed|rlock_acquire")
GIL_TAKERS = re.compile(r"take_gil|PyEval_RestoreThread|PyEval_AcquireThread|PyGILState_Ensure|gil_scoped_acquire")


@dataclass
class Args:
    flags: str = ""
    """flags for the training script, as one string"""
    script: str = os.path.join(REPO, "pql_threaded.py")
    """the training script to run and sample"""
    seconds: float = 10.0
    """how long py-spy samples, from the start of training"""
    rate: int = 200
    """samples per second and thread"""
    read: Optional[str] = None
    """sort the stacks of this file (py-spy's --format raw) instead of running anything"""
    out: str = "thread_stacks.txt"
    """where py-spy writes the stacks it samples (--format raw)"""
    top: int = 8
    """how many of the script's lines to list per thread"""


def parse_frame(frame):
    """'name (file:line)' or 'name (library)' or '0x7f.. (library)' -> (name, where); name '' when unknown."""
    match = re.match(r"^(.*?) \(([^()]*)\)$", frame)
    name, where = (match.group(1), match.group(2)) if match else (frame, "")
    return ("" if name.startswith("0x") else name), where


def category(frames):
    """One sample's category, from its frames (outermost first), as the module docstring lists them."""
    innermost_python = max((i for i, (_, where) in enumerate(frames) if ".py:" in where), default=-1)
    native = frames[innermost_python + 1:]  # the native frames below the innermost Python frame
    named = [(name, where) for name, where in native if name]  # libraries' unexported functions have no name
    waits_on_libc = bool(named) and bool(LIBC_WAITS.match(named[-1][0]))
    if any("libcuda" in where for _, where in native):
        if any("Synchronize" in name for name, _ in named):
            return "waiting for the GPU"
        return "CUDA driver, on a lock" if waits_on_libc else "CUDA runtime or driver"
    if not named:
        return "Python" if all("libpython" in where for _, where in native) else "other"
    callers = [(name, where) for name, where in named if not LIBC_WAITS.match(name)]
    caller_name, caller_where = callers[-1] if callers else ("", "")  # the innermost caller of a libc wait
    if PYTHON_LOCKS.search(caller_name):
        return "a Python lock or condition"
    if waits_on_libc or GIL_TAKERS.search(caller_name):
        if GIL_TAKERS.search(caller_name) or re.search(r"libpython|libtorch_python", caller_where):
            return "taking the GIL back"
        return "other"
    if re.search(r"libtorch|libc10", named[-1][1]):
        return "torch's C++"
    if "libpython" in named[-1][1]:
        return "Python"
    return "other"


def read_stacks(path):
    """py-spy's raw format: one line per distinct stack, 'thread (tid): name;frame;...;frame count'."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            thread, *frames = stack.split(";")
            yield thread.split(": ", 1)[-1], [parse_frame(frame) for frame in frames], int(count)


def summarise(path, script_name, top):
    samples = collections.Counter()
    by_category = collections.defaultdict(collections.Counter)
    by_line = collections.defaultdict(collections.Counter)
    for thread, frames, count in read_stacks(path):
        samples[thread] += count
        by_category[thread][category(frames)] += count
        lines = [f"{name} ({where})" for name, where in frames if where.startswith(script_name + ":")]
        by_line[thread][lines[-1] if lines else "(not in the script)"] += count
    threads = [thread for thread, _ in samples.most_common()]
    print(f"Samples per thread, sorted by the innermost frames ({path}):\n")
    print("| thread | samples | " + " | ".join(CATEGORIES) + " |")
    print("|---|---|" + "---|" * len(CATEGORIES))
    for thread in threads:
        shares = [f"{100 * by_category[thread][c] / samples[thread]:.0f}%" for c in CATEGORIES]
        print(f"| {thread} | {samples[thread]} | " + " | ".join(shares) + " |")
    for thread in threads:
        print(f"\n{thread}: where in {script_name} (innermost frame of the script), top {top}:")
        for line, count in by_line[thread].most_common(top):
            print(f"  {100 * count / samples[thread]:5.1f}%  {line}")
    return samples, by_category


def read_text(path):
    with open(path, errors="replace") as file:
        return file.read()


def record(args):
    """Run the script, wait for training to start, let py-spy sample it for args.seconds; an error message, or None."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        return "py-spy not found; install it with `pip install py-spy` (see this script's docstring)"
    command = [sys.executable, args.script] + shlex.split(args.flags) + ["--exp-name", "thread_stacks"]
    print("running:", " ".join(command), flush=True)
    stderr_path = args.out + ".stderr"
    with open(stderr_path, "w") as stderr:
        training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while training.poll() is None and "0%|" not in read_text(stderr_path):
            time.sleep(0.2)  # the progress bar's first frame: training starts
        if training.poll() is not None:
            return f"{os.path.basename(args.script)} ended (exit code {training.returncode}) before training started; see {stderr_path}"
        sampling = subprocess.run([py_spy, "record", "--pid", str(training.pid), "--duration", str(int(args.seconds)), "--rate",
                                   str(args.rate), "--native", "--idle", "--threads", "--format", "raw", "--output", args.out], check=False)
        if sampling.returncode != 0:
            return f"py-spy exited with {sampling.returncode} (it reads the run's memory: as root, or with kernel.yama.ptrace_scope 0)"
    finally:
        if training.poll() is None:  # the samples are in: stop the run (SIGTERM: it saves and exits)
            training.terminate()
            training.wait()
    return None


def main():
    args = tyro.cli(Args)
    if args.read is not None:
        if not os.path.isfile(args.read):
            print(f"error: --read {args.read}: no such file", file=sys.stderr)
            return 2
    else:
        if not os.path.isfile(args.script):
            print(f"error: --script {args.script}: no such file", file=sys.stderr)
            return 2
        if not args.seconds >= 1:
            print(f"error: --seconds must be >= 1 (py-spy samples whole seconds), got {args.seconds}", file=sys.stderr)
            return 2
        if not 1 <= args.rate <= 1000:
            print(f"error: --rate must be 1 to 1000 samples per second, got {args.rate}", file=sys.stderr)
            return 2
        error = record(args)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    summarise(args.read or args.out, os.path.basename(args.script), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
