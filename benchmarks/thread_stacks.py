"""What each thread of a training run is doing, sampled: py-spy's stacks, sorted and counted.

    python benchmarks/thread_stacks.py --flags="--compile --bf16 --total-timesteps 12000000"   # on a GPU
    python benchmarks/thread_stacks.py --flags="--device cpu --num-envs 64 --hidden-dims 64 64 --batch-size 1024 --total-timesteps 30000"
    python benchmarks/thread_stacks.py --read stacks.txt          # sort a file py-spy wrote before

threaded_roles.py times pql_threaded.py's roles from inside and finds, under `--compile --bf16` on
a GPU, an actor that spends most of its loop on a CPU outside the calls it times, and 110 to 220
context switches per iteration in each thread. This script looks at that CPU time from outside: it starts
the script (--script, default pql_threaded.py) with --flags, waits until training starts (the
progress bar's first frame: compiling and recording CUDA graphs come before it), then lets py-spy
sample every Python thread's stack, Python and native frames, for --seconds, stops the run
(SIGTERM: it saves a checkpoint and exits; its runs/ folder is named thread_stacks), and sorts each
sample by its innermost frames into one of:

  * the GIL: waiting on a libc lock or condition for Python's GIL, to take it back (a torch call
    returning, torch touching a Python object, a Python lock just acquired) or to hand it over;
  * a Python lock or condition: in threading's locks, events and conditions (a role waiting for
    another, the replay lock);
  * waiting for the GPU: in a CUDA synchronize call;
  * CUDA driver, on a lock: in a CUDA library or the driver, waiting on a libc lock or condition
    (threads that launch into one CUDA context at once take turns on the driver's locks; a launch
    into a full queue, or a copy from pageable memory, may wait here or in the next column too);
  * CUDA: any other time in the CUDA runtime, cuBLAS or the driver (launches, copies, events);
  * torch's C++, waiting: torch's own locks and conditions (the caching allocator's, autograd's
    engine waiting for its device threads);
  * torch's C++: the rest of libtorch and libc10 (on a GPU: dispatching kernels; on a CPU the kernels
    too, OpenMP's parallel regions included), malloc and memcpy in it included;
  * Python: the interpreter, running the scripts' Python;
  * other: anything else; the innermost named frames of these samples are listed under the table.

How the GIL shows: py-spy keeps few of CPython's own native frames (no take_gil, no
PyEval_RestoreThread), so a wait for the GIL is a libc wait right under a Python frame, under
torch's Python bindings (libtorch_python), or under a libpython frame other than the one that waits
for a Python lock (PyThread_acquire_lock_timed).

And, for each thread, the lines of the script where its samples were, innermost frame of the
script in each stack. Not sampled: threads without Python (torch's autograd device threads, the CUDA
driver's own). py-spy stops the process for each native sample, so the run is slower while sampled:
read the shares, not the speed. py-spy is not a dependency of pql: `pip install py-spy` (a binary
wheel; on a machine without the internet, carry the wheel). It reads the training process's memory
(ptrace), which a process may do to another of its user's unless Linux's Yama allows it only to
parents (kernel.yama.ptrace_scope 1: the run asks Yama to let any process read it) or a container
withholds it (CAP_SYS_PTRACE).
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

CATEGORIES = ("the GIL", "a Python lock or condition", "waiting for the GPU", "CUDA driver, on a lock", "CUDA",
              "torch's C++, waiting", "torch's C++", "Python", "other")
LIBC_WAITS = re.compile(r"^(pthread_cond_(timed|clock)?wait|pthread_mutex_(timed)?lock|pthread_rwlock_\w*lock|__lll_lock_wait\w*|"
                        r"futex\w*|__futex\w*|sem_(timed|clock)?wait|sched_yield|syscall|nanosleep|clock_nanosleep)$")
PYTHON_LOCK_WAIT = "PyThread_acquire_lock_timed"  # the one libpython frame py-spy shows under a wait for a Python lock
# libc and its kin (malloc, memcpy, ...) and OpenMP (whose threads run torch's CPU kernels): their caller decides
SYSTEM_LIBRARIES = re.compile(r"^(libc|libstdc\+\+|ld-linux|libgcc|libm|libpthread|libgomp|libiomp5)[.-]")
CUDA_LIBRARIES = re.compile(r"^(libcuda\.so|libcudart|libcublas)")
# The training runs under this wrapper: where Linux's Yama lets a process be read only by its
# parents (kernel.yama.ptrace_scope 1), it allows any process of the same user, py-spy too
# (prctl PR_SET_PTRACER, PR_SET_PTRACER_ANY); elsewhere the call fails and changes nothing.
LET_PY_SPY_ATTACH = """
import ctypes, os, runpy, sys
try:
    ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)
except (OSError, AttributeError):
    pass
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py` would: its folder first
runpy.run_path(sys.argv[0], run_name="__main__")
"""
TRAINING_STARTED = re.compile(r"(?<![0-9])0%\|.*step")  # the progress bar's first frame: "  0%|   | 0.00/12.0M [00:00<?, ?step/s]"


@dataclass
class Args:
    flags: str = ""
    """flags for the training script, as one string"""
    script: str = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pql_threaded.py")
    """the training script to run and sample"""
    seconds: float = 10.0
    """how long py-spy samples, from the start of training"""
    rate: int = 200
    """samples per second and thread"""
    start_timeout: float = 900.0
    """seconds to wait for training to start (imports, compiling, recording CUDA graphs) before giving up"""
    read: Optional[str] = None
    """sort the stacks of this file (py-spy's --format raw) instead of running anything"""
    out: str = "thread_stacks.txt"
    """where py-spy writes the stacks it samples (--format raw)"""
    top: int = 8
    """how many of the script's lines to list per thread"""


def parse_frame(frame):
    """'name (file:line)' or 'name (library)' or '0x7f.. (library)' -> (name, where); name '' when unknown."""
    match = re.match(r"^(.*) \(([^()]*)\)$", frame)
    name, where = (match.group(1), match.group(2)) if match else (frame, "")
    return ("" if name.startswith("0x") else name), where


def category(frames):
    """One sample's category, from its frames (outermost first), as the module docstring lists them."""
    innermost_python = max((i for i, (_, where) in enumerate(frames) if ".py:" in where), default=-1)
    native = frames[innermost_python + 1:]  # the native frames below the innermost Python frame
    named = [(name, where) for name, where in native if name]  # libraries' unexported functions have no name
    waits = bool(named) and bool(LIBC_WAITS.match(named[-1][0]))
    if any(CUDA_LIBRARIES.match(where) for _, where in native):
        if any("Synchronize" in name for name, _ in named):
            return "waiting for the GPU"
        return "CUDA driver, on a lock" if waits else "CUDA"
    callers = [(name, where) for name, where in named if not SYSTEM_LIBRARIES.match(where)]
    caller_name, caller_where = callers[-1] if callers else ("", "")  # the innermost frame outside libc and its kin
    if caller_name == PYTHON_LOCK_WAIT:
        return "a Python lock or condition"
    if waits:
        if not callers or re.match(r"libpython|libtorch_python", caller_where):
            return "the GIL"  # see the module docstring: how the GIL shows
        return "torch's C++, waiting" if re.match(r"libtorch|libc10", caller_where) else "other"
    if not callers:  # a Python frame at the bottom, or only libc's frames under it
        return "Python" if all(where.startswith("libpython") for _, where in native) else "other"
    if re.match(r"libtorch|libc10", caller_where):
        return "torch's C++"
    return "Python" if caller_where.startswith("libpython") else "other"


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
    others = collections.defaultdict(collections.Counter)
    for thread, frames, count in read_stacks(path):
        samples[thread] += count
        sort = category(frames)
        by_category[thread][sort] += count
        if sort == "other":
            names = [f"{name} ({where})" for name, where in frames if name]
            others[thread][names[-1] if names else "(no named frame)"] += count
        lines = [f"{name} ({where})" for name, where in frames if where.startswith(script_name + ":")]
        by_line[thread][lines[-1] if lines else "(not in the script)"] += count
    threads = [thread for thread, _ in samples.most_common()]
    print(f"Samples per thread, sorted by the innermost frames ({path}):\n")
    print("| thread | samples | " + " | ".join(CATEGORIES) + " |")
    print("|---|---|" + "---|" * len(CATEGORIES))
    for thread in threads:
        shares = [f"{100 * by_category[thread][c] / samples[thread]:.1f}%" for c in CATEGORIES]
        print(f"| {thread} | {samples[thread]} | " + " | ".join(shares) + " |")
    for thread in threads:
        print(f"\n{thread}: where in {script_name} (innermost frame of the script), top {top}:")
        for line, count in by_line[thread].most_common(top):
            print(f"  {100 * count / samples[thread]:5.1f}%  {line}")
        for frame, count in others[thread].most_common(3):
            print(f"  other: {100 * count / samples[thread]:5.1f}%  in {frame}")


def read_text(path):
    with open(path, errors="replace") as file:
        return file.read()


def record(args):
    """Run the script, wait for training to start, let py-spy sample it for args.seconds; an error message, or None."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is None:
        return "py-spy not found; install it with `pip install py-spy` (see this script's docstring)"
    script_and_flags = [args.script] + shlex.split(args.flags) + ["--exp-name", "thread_stacks"]
    print("running: python", " ".join(script_and_flags), flush=True)
    command = [sys.executable, "-c", LET_PY_SPY_ATTACH] + script_and_flags
    stderr_path = args.out + ".stderr"
    environment = {name: value for name, value in os.environ.items() if name != "TQDM_DISABLE"}  # the bar says when training starts
    with open(stderr_path, "w") as stderr:
        training = subprocess.Popen(command, stdout=stderr, stderr=stderr, env=environment)
    try:
        waiting_since = time.time()
        while training.poll() is None and not TRAINING_STARTED.search(read_text(stderr_path)):
            if time.time() - waiting_since > args.start_timeout:
                return f"training did not start within --start-timeout {args.start_timeout:g} s; see {stderr_path}"
            time.sleep(0.2)
        if training.poll() is not None:
            return f"{os.path.basename(args.script)} ended (exit code {training.returncode}) before training started; see {stderr_path}"
        sampling = subprocess.run([py_spy, "record", "--pid", str(training.pid), "--duration", str(int(args.seconds)), "--rate",
                                   str(args.rate), "--native", "--idle", "--threads", "--format", "raw", "--output", args.out],
                                  check=False, timeout=args.seconds + 120)
        if sampling.returncode != 0:
            return (f"py-spy exited with {sampling.returncode}: it reads the run's memory (ptrace), which Yama "
                    "(kernel.yama.ptrace_scope 2 or 3) or a container without CAP_SYS_PTRACE may refuse")
        if training.poll() is not None:
            print(f"note: the run ended (exit code {training.returncode}) before the {args.seconds:g} s of sampling did; "
                  f"the samples cover less; see {stderr_path}", file=sys.stderr)
        if not os.path.isfile(args.out) or not read_text(args.out).strip():
            return f"py-spy wrote no samples to {args.out}"
    finally:
        if training.poll() is None:  # the samples are in: stop the run (SIGTERM: it saves and exits)
            training.terminate()
            try:
                training.wait(timeout=120)
            except subprocess.TimeoutExpired:
                training.kill()
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
        if not args.start_timeout > 0:
            print(f"error: --start-timeout must be > 0 seconds, got {args.start_timeout}", file=sys.stderr)
            return 2
        error = record(args)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    summarise(args.read or args.out, os.path.basename(args.script), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
