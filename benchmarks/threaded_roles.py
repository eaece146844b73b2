"""Where pql_threaded.py's three roles spend their time: one training run, timed role by role.

    python benchmarks/threaded_roles.py                                   # the defaults (on a GPU: 4096 envs)
    python benchmarks/threaded_roles.py --flags="--compile --bf16"        # with more flags for pql_threaded.py
    python benchmarks/threaded_roles.py --switch-interval 0.0005 --actor-priority   # two experiments
    python benchmarks/threaded_roles.py --flags="--device cpu --num-envs 16 --hidden-dims 32 32 --batch-size 64 --buffer-size 16000"

The run is pql_threaded.py itself (--script, default the repository's), imported and run in this
process with some of its functions wrapped in timers: nothing in its logic changes. Each role's
window runs from the start of its loop to the stop of the run (the learners: their threads'
bodies; the actor, the main thread: from its first coordination call to its call of
Coordinator.stop), so recording CUDA graphs and compiling (done before the threads start, with or
without graphs) are left out; the warm-up iterations are in. For each role, the shares of its window:

  * waiting for its rule: inside Coordinator.wait_until, because the others have not done their
    share yet (the V-learner waits for data, the actor for the V-learner, ...);
  * waiting for its GPU: inside InFlightLimit.mark, for its own update of MAX_UPDATES_IN_FLIGHT ago;
  * in the replay lock: inside SharedReplay.add (actor) and fill_window (learners), the lock's wait
    and the work done holding it;
  * each of these three includes taking the GIL back when the call returns (up to the switch
    interval when another thread runs Python), and the CPU time spent inside the call;
  * on a CPU outside those calls: the thread's CPU time (time.thread_time) less the CPU time inside them;
  * the rest: runnable but without the GIL, or blocked in another call (a CUDA launch on a full
    queue, a copy);
  * voluntary context switches per iteration (Linux: /proc/thread-self/status), how often the
    thread gave up its core: each GIL hand-off between threads is one.

A role that waits for its rule most of the time is not the bottleneck; the one that does not is.
--switch-interval sets Python's GIL switch interval (how long a thread that wants the GIL lets
another run Python before it asks for it; by default the script's own: pql_threaded.py sets 0.5 ms
since 2026-11-27, Python's default is 5 ms); --actor-priority gives the actor CUDA streams of its
own at the highest priority this GPU offers (the learners' stay at 0, the lowest), so its kernels go
first when the learners' fill the GPU (pql_threaded.py keeps the actor on the default stream, where
a simulator's own GPU work is ordered with it: an experiment for the built-in torch envs only).
"""
import collections
import contextlib
import importlib.util
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = ("actor", "v-learner", "p-learner")


@dataclass
class Args:
    """Runs pql_threaded.py once and prints where each of its roles spent the run."""

    flags: str = ""
    """flags for pql_threaded.py, e.g. "--compile --bf16" (its defaults otherwise)"""
    script: str = os.path.join(REPO, "pql_threaded.py")
    """the pql_threaded.py to run (another copy of it, e.g. an older commit's, to compare)"""
    switch_interval: Optional[float] = None
    """Python's GIL switch interval in seconds during the run (sys.setswitchinterval); default: the script's own
    (its GIL_SWITCH_INTERVAL, 0.0005 since 2026-11-27; Python's 0.005 for a script without one)"""
    actor_priority: bool = False
    """give the actor's CUDA streams the highest priority (no effect on the CPU)"""


def load_pql_threaded(path):
    """Import the script as the module pql_threaded (its `envs` from the repository)."""
    sys.path.insert(0, REPO)
    spec = importlib.util.spec_from_file_location("pql_threaded", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["pql_threaded"] = module
    spec.loader.exec_module(module)
    return module


def context_switches():
    try:
        with open("/proc/thread-self/status") as f:
            return next(int(line.split(":")[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    except (OSError, StopIteration):
        return float("nan")  # not Linux


class RoleClock:
    """Sums, per role, the seconds spent inside the wrapped functions, and each role's CPU time
    and context switches between start() (per thread) and stop()."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)  # (role, what) -> seconds
        self.lock = threading.Lock()
        self.started = {}  # role -> (wall, cpu, context switches) when it started
        self.totals = {}  # role -> (wall, cpu, context switches) over its loop
        self.actor_stream_priority = None  # set by --actor-priority where the actor has CUDA streams

    @staticmethod
    def role():
        thread = threading.current_thread()
        return "actor" if thread is threading.main_thread() else thread.name

    def wrap(self, owner, name, what):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[(self.role(), what)] += time.perf_counter() - start
                    self.seconds[(self.role(), "cpu inside")] += time.thread_time() - cpu_start
        setattr(owner, name, timed)

    def start(self):
        self.started[self.role()] = (time.perf_counter(), time.thread_time(), context_switches())

    def stop(self):
        if self.role() in self.started and self.role() not in self.totals:
            wall, cpu, switches = self.started[self.role()]
            self.totals[self.role()] = (time.perf_counter() - wall, time.thread_time() - cpu, context_switches() - switches)


def run(args):
    pql_threaded = load_pql_threaded(args.script)
    if args.switch_interval is None:
        args.switch_interval = getattr(pql_threaded, "GIL_SWITCH_INTERVAL", sys.getswitchinterval())
    pql_threaded.GIL_SWITCH_INTERVAL = args.switch_interval  # what the script's set_up_and_run sets
    sys.setswitchinterval(args.switch_interval)  # for a script that sets none
    clock, coordinators = RoleClock(), []
    clock.wrap(pql_threaded.Coordinator, "wait_until", "rule")
    clock.wrap(pql_threaded.InFlightLimit, "mark", "gpu")
    clock.wrap(pql_threaded.SharedReplay, "add", "lock")
    clock.wrap(pql_threaded.SharedReplay, "fill_window", "lock")
    original_init = pql_threaded.Coordinator.__init__

    def init(coordinator, *init_args):
        original_init(coordinator, *init_args)
        coordinators.append(coordinator)
    pql_threaded.Coordinator.__init__ = init

    # A learner's loop is its thread's body. The actor's (the main thread's) starts at its first
    # coordination call and ends at its call of Coordinator.stop.
    original_thread_run = threading.Thread.run

    def thread_run(thread):
        if thread.name in ROLES:
            clock.start()
        try:
            original_thread_run(thread)
        finally:
            if thread.name in ROLES:
                clock.stop()
    threading.Thread.run = thread_run
    original_wait_until = pql_threaded.Coordinator.wait_until

    def wait_until(coordinator, *wait_args, **wait_kwargs):
        if clock.role() == "actor" and "actor" not in clock.started:
            clock.start()
        return original_wait_until(coordinator, *wait_args, **wait_kwargs)
    pql_threaded.Coordinator.wait_until = wait_until
    original_stop = pql_threaded.Coordinator.stop

    def stop(coordinator, *stop_args, **stop_kwargs):
        if clock.role() == "actor":
            clock.stop()  # the first call ends the actor's window (the learners' end with their threads)
        return original_stop(coordinator, *stop_args, **stop_kwargs)
    pql_threaded.Coordinator.stop = stop

    if args.actor_priority:
        original_role_streams = pql_threaded.role_streams
        torch = pql_threaded.torch

        def role_streams(own_device, *other_devices, **options):
            if clock.role() != "actor" or own_device.type != "cuda":
                return original_role_streams(own_device, *other_devices, **options)
            contexts = contextlib.ExitStack()
            for device in [device for device in dict.fromkeys(other_devices) if device != own_device] + [own_device]:
                if device.type == "cuda":
                    _, highest = getattr(torch.cuda.Stream, "priority_range", lambda: (0, -1))()  # (lowest, highest): lower numbers go first
                    stream = torch.cuda.Stream(device, priority=highest)
                    clock.actor_stream_priority = stream.priority
                    stream.wait_stream(torch.cuda.default_stream(device))
                    contexts.enter_context(torch.cuda.stream(stream))
            contexts.enter_context(torch.cuda.device(own_device))
            return contexts
        pql_threaded.role_streams = role_streams

    sys.argv = [args.script, *args.flags.split(), "--exp-name", "threaded_roles"]
    exit_code = pql_threaded.main()
    if exit_code != 0 or not coordinators or "actor" not in clock.started:
        print(f"error: pql_threaded.py exited with {exit_code} before its roles ran", file=sys.stderr)
        return exit_code or 1
    clock.stop()  # if the actor's loop ended without its call of Coordinator.stop
    return report(clock, coordinators[0], args)


def report(clock, coordinator, args):
    iterations = max(coordinator.iterations, 1)
    wall = clock.totals["v-learner"][0]
    priority = ""
    if args.actor_priority:
        priority = (f", actor streams at priority {clock.actor_stream_priority} (the learners' at 0)" if clock.actor_stream_priority is not None
                    else ", --actor-priority without effect: no CUDA streams")
    print(f"pql_threaded.py {args.flags} (switch interval {args.switch_interval * 1000:g} ms{priority}): {coordinator.iterations} iterations,"
          f" {coordinator.v_updates} V-updates, {coordinator.p_updates} P-updates in {wall:.1f} s of loops"
          f" ({coordinator.iterations / wall:.1f} iterations/s)\n")
    print("| role | loop s | waiting for its rule | waiting for its GPU | in the replay lock | on a CPU, outside those calls |"
          " the rest (GIL, other waits) | context switches per iteration |")
    print("|---|---|---|---|---|---|---|---|")
    for role in ROLES:
        role_wall, cpu, switches = clock.totals[role]
        waits = {what: clock.seconds[(role, what)] for what in ("rule", "gpu", "lock")}
        cpu = max(cpu - clock.seconds[(role, "cpu inside")], 0.0)
        rest = max(role_wall - sum(waits.values()) - cpu, 0.0)
        shares = [f"{seconds:.2f} s ({100 * seconds / role_wall:.0f}%)" for seconds in (*waits.values(), cpu, rest)]
        print(f"| {role} | {role_wall:.2f} | {' | '.join(shares)} | {switches / iterations:.0f} |")
    return 0


def main():
    args = tyro.cli(Args)
    if not os.path.isfile(args.script):
        print(f"error: --script {args.script}: no such file", file=sys.stderr)
        return 2
    if args.switch_interval is not None and not args.switch_interval > 0:
        print(f"error: --switch-interval must be > 0 seconds, got {args.switch_interval}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
