"""Model checks of how pql_threaded.py's three roles coordinate: no deadlock, the ratios hold,
and the actor never overwrites a replay-buffer slot that a learner may still be reading.

The threads are replaced by a small state machine whose every interleaving is explored
(breadth first, memoising visited states). The rules themselves are not copied: the model asks
a real pql_threaded.Coordinator, with its counters set to the model's, and uses
overwrite_guard, MAX_UPDATES_IN_FLIGHT and ACTOR_LEAD_ITERATIONS as pql_threaded defines them.

The roles and their atomic steps
--------------------------------
Actor, one iteration in three steps:
  ENQUEUE  when actor_may_step(): the writes of column number `iterations` (0-based) are
           enqueued on the GPU. The GPU may execute them at once, so from this moment on the
           ring slot `column % capacity` counts as being overwritten.
  PUBLISH  the column becomes visible to the learners (ReplayBuffer.pos/size advance).
  COUNT    `iterations` += 1.
  In the code ENQUEUE and PUBLISH are one critical section (SharedReplay.add) and COUNT another.
  The model splits all three: that allows every interleaving of the code and more (a learner
  may choose rows between a write and its publication, so it sees the ring one column older
  than the code ever shows it), which is conservative.
V-learner and P-learner, one update in two steps:
  CHOOSE   when the learner's rule holds: choose the rows (under the lock, from pos/size) and
           enqueue their read (the gather) and the update on the learner's stream. A row of age a
           (0: the newest visible column) is sampleable if a < min(size, capacity - guard). The
           read is remembered by the oldest column it may touch; it may touch any sampleable
           column (the gather's n-step windows only reach forward, to newer columns).
  COUNT    InFlightLimit.mark(), then the counter (v_updates or p_updates) += 1.
  In the code the rule is checked in one critical section, the rows are chosen in the next and
  the gather is enqueued after that. Merging the check into CHOOSE loses nothing: no rule can
  turn false while its role is about to act (the other roles' counters only grow, and each rule
  is monotone in them). The read is pending from CHOOSE on, which covers an enqueue that comes
  later. mark() and the count are separate in the code; merging them keeps reads pending longer
  (see below), which is conservative.

The GPU lag
-----------
A read may stay pending on the GPU long after it was enqueued. InFlightLimit only guarantees
that the read of update k has completed once the same learner has marked update
k + MAX_UPDATES_IN_FLIGHT, so the model keeps every read pending until the COUNT of that update.
A read that completes earlier (as it usually does) can only avoid conflicts, so this latest
completion is the one to check. A read is corrupted if, while it is pending, the actor ENQUEUEs
a newer column into a slot the read may touch: column c conflicts with a pending read whose
oldest column is o if c >= o + capacity. The overwrite guard claims this never happens.
(Not modelled: for rows younger than nstep - 1 the gather also reads the slots just after the
newest column, which are the ones the actor writes next; those values are masked out by
multiplying with 0, so the race is harmless unless a value there is not finite.)

A conflict involves one read. So instead of remembering every pending read of both learners,
the explorer guesses which read will be overwritten: at each CHOOSE, if it watches no read, it
may start watching this one (both branches are explored), and it follows that read until it
completes. Every read is watched on some path, so every conflict is found, and a state holds
one read instead of up to 2 * (MAX_UPDATES_IN_FLIGHT + 1).

Runs of any length, in finitely many states
-------------------------------------------
The rules compare counters linearly, so shifting a state by one period (r iterations,
vps * r V-updates, vps P-updates and r columns for the watched read; vps =
v_updates_per_env_step, r = v_updates_per_p_update) changes no rule's answer and no conflict.
Without a budget the explorer shifts every state down by as many periods as keep it past the
ring-filling phase (from capacity - guard visible columns on, a new read's oldest column is a
fixed distance behind the newest), so finitely many states stand for runs of any length; each
shift is checked not to change any rule's answer, and a test checks that a bounded run finds
the same smallest safe guard. There a deadlock is any reachable state where every role waits.
With a budget the actor stops after `budget` iterations, and the only state allowed to have no
move is the end: actor done, learners idle, the V-learner's data and the V-updates used up.

Findings (with ACTOR_LEAD_ITERATIONS 1, P_LAG_UPDATES 2, MAX_UPDATES_IN_FLIGHT 2): no deadlock
and the ratios hold; the guard is never exceeded, but it is conservative, not tight (see
test_the_overwrite_check_can_fail); P_LAG_UPDATES 0 deadlocks at once, 1 would not.
"""
import collections
import threading
import time
import types

import pytest

import pql_threaded

ACTOR_IDLE, ACTOR_ENQUEUED, ACTOR_PUBLISHED = 0, 1, 2


def make_args(warmup_iterations, v_updates_per_env_step, v_updates_per_p_update):
    return types.SimpleNamespace(warmup_iterations=warmup_iterations, v_updates_per_env_step=v_updates_per_env_step,
                                 v_updates_per_p_update=v_updates_per_p_update)


# The actor's iteration count and phase; each learner's update count and whether it is busy (rows
# chosen, update not yet counted); and the one pending read the explorer watches, if any:
# (learner "v" or "p", its update number, the oldest column it may touch).
State = collections.namedtuple("State", "iterations actor v_updates v_busy p_updates p_busy watched")
START = State(0, ACTOR_IDLE, 0, False, 0, False, None)
# problem: None, or what went wrong; trace: the moves from the start that lead to it; states: how many were explored.
Result = collections.namedtuple("Result", "problem trace states")


class Model:
    """The three roles as a state machine. `guard` and `capacity` default to overwrite_guard(args)
    and the smallest capacity the script accepts; `watch_reads=False` leaves the overwrite check
    out (fewer states) for the deadlock and ratio checks."""

    def __init__(self, args, capacity=None, guard=None, budget=None, watch_reads=True):
        self.args = args
        self.coordinator = pql_threaded.Coordinator(args)
        self.guard = pql_threaded.overwrite_guard(args) if guard is None else guard
        self.capacity = self.guard + 1 if capacity is None else capacity
        assert self.capacity > self.guard, "the script refuses capacity <= overwrite_guard"
        self.in_flight = pql_threaded.MAX_UPDATES_IN_FLIGHT
        self.budget, self.watch_reads = budget, watch_reads
        self.periodic = budget is None
        vps, r = args.v_updates_per_env_step, args.v_updates_per_p_update
        self.period = {"iterations": r, "v": vps * r, "p": vps}
        # From this many visible columns on, a new read's oldest column is visible - (capacity - guard).
        self.filled = self.capacity - self.guard
        self.rule_cache = {}

    def rules(self, iterations, v_updates, p_updates):
        """(actor_may_step, v_learner_may_update, p_learner_may_update), asked of the real Coordinator."""
        key = (iterations, v_updates, p_updates)
        if key not in self.rule_cache:
            c = self.coordinator
            c.iterations, c.v_updates, c.p_updates = key
            self.rule_cache[key] = (c.actor_may_step(), c.v_learner_may_update(), c.p_learner_may_update())
        return self.rule_cache[key]

    def oldest_sampleable_column(self, visible):
        """As ReplayBuffer.sample_rows: ages 0 .. min(size, capacity - guard) - 1 before the newest column."""
        size = min(visible, self.capacity)
        sampleable = min(size, self.capacity - self.guard)
        assert sampleable >= 1, "a learner samples an empty buffer"
        return visible - sampleable

    def moves(self, s):
        """Yield (move, description, next state, problem or None) for every step a role can take in s.
        The move names the role ("actor", "v", "p"; "v watched"/"p watched": choosing rows and
        watching that read) and is all a trace needs to be replayed."""
        actor_may, v_may, p_may = self.rules(s.iterations, s.v_updates, s.p_updates)
        # The actor
        if s.actor == ACTOR_IDLE and actor_may and (self.budget is None or s.iterations < self.budget):
            column, problem = s.iterations, None
            if s.watched is not None and column >= s.watched[2] + self.capacity:
                learner, update, oldest = s.watched
                problem = (f"overwrite: the actor enqueues column {column} into ring slot {column % self.capacity} "
                           f"(capacity {self.capacity}, guard {self.guard}) while the read of {learner}-update {update}, "
                           f"which may touch column {oldest} in that slot, may still be pending")
            yield "actor", f"actor enqueues column {column}", s._replace(actor=ACTOR_ENQUEUED), problem
        elif s.actor == ACTOR_ENQUEUED:
            yield "actor", f"actor publishes column {s.iterations}", s._replace(actor=ACTOR_PUBLISHED), None
        elif s.actor == ACTOR_PUBLISHED:
            counted = s._replace(iterations=s.iterations + 1, actor=ACTOR_IDLE)
            yield "actor", f"actor counts: iterations = {counted.iterations}", counted, None
        # The learners
        visible = s.iterations + (s.actor == ACTOR_PUBLISHED)
        for learner, may, updates, busy in [("v", v_may, s.v_updates, s.v_busy), ("p", p_may, s.p_updates, s.p_busy)]:
            if busy:
                # mark(): the read of update `updates - in_flight` has completed at the latest now; then count.
                watched = s.watched
                if watched is not None and watched[:2] == (learner, updates - self.in_flight):
                    watched = None
                change = {f"{learner}_updates": updates + 1, f"{learner}_busy": False, "watched": watched}
                description = f"{learner}-learner marks and counts: {learner}_updates = {updates + 1}"
                yield learner, description, s._replace(**change), None
            elif may:
                oldest = self.oldest_sampleable_column(visible)
                description = f"{learner}-learner chooses rows in columns {oldest}..{visible - 1} for update {updates}"
                yield learner, description, s._replace(**{f"{learner}_busy": True}), None
                if self.watch_reads and s.watched is None:
                    change = {f"{learner}_busy": True, "watched": (learner, updates, oldest)}
                    yield learner + " watched", description + " (watched)", s._replace(**change), None

    def invariant_problem(self, s):
        """The ratios the counting is meant to hold, in every state."""
        a = self.args
        vps, r, w = a.v_updates_per_env_step, a.v_updates_per_p_update, a.warmup_iterations
        if s.v_updates > vps * max(0, s.iterations - w):
            return "ratio: the V-learner is ahead of the data"
        if s.p_updates * r > s.v_updates:
            return "ratio: the P-learner is ahead of the V-learner"
        started = s.iterations + (s.actor != ACTOR_IDLE)  # the column in progress was allowed too
        if s.v_updates < vps * (started - 1 - w - pql_threaded.ACTOR_LEAD_ITERATIONS):
            return "ratio: the actor leads by more than ACTOR_LEAD_ITERATIONS"
        return None

    def is_end(self, s):
        """With a budget, the one kind of state where nothing may move: the actor is done, the
        learners are idle, the V-learner has used all the data and the P-learner all V-updates."""
        learning = max(0, self.budget - self.args.warmup_iterations)
        return (s.iterations == self.budget and s.actor == ACTOR_IDLE and not s.v_busy and not s.p_busy
                and s.v_updates == self.args.v_updates_per_env_step * learning
                and (s.p_updates + 1) * self.args.v_updates_per_p_update > s.v_updates)

    def canonical(self, s):
        """s shifted down by as many whole periods as keep it past the ring-filling phase (see the
        module docstring); s itself with a budget."""
        period = self.period
        k = min(s.p_updates // period["p"], (s.iterations - self.filled) // period["iterations"])
        if not self.periodic or k <= 0:
            return s
        watched = s.watched
        if watched is not None:
            learner, update, oldest = watched
            watched = (learner, update - k * period[learner], oldest - k * period["iterations"])
        shifted = s._replace(iterations=s.iterations - k * period["iterations"], v_updates=s.v_updates - k * period["v"],
                             p_updates=s.p_updates - k * period["p"], watched=watched)
        assert self.rules(s.iterations, s.v_updates, s.p_updates) == self.rules(
            shifted.iterations, shifted.v_updates, shifted.p_updates), f"the rules are not periodic: {s} vs {shifted}"
        return shifted

    def explore(self):
        """Breadth first over all interleavings: the first problem found, with a shortest trace."""
        parent = {START: None}  # state -> (previous state, move)
        queue = collections.deque([START])

        def failure(problem, state, last_move=None):
            moves = [] if last_move is None else [last_move]
            while parent[state] is not None:
                state, move = parent[state]
                moves.append(move)
            descriptions, final_state, last_problem = self.replay(moves[::-1])
            return Result(last_problem or f"{problem} in {final_state}", descriptions, len(parent))

        while queue:
            s = queue.popleft()
            problem = self.invariant_problem(s)
            if problem:
                return failure(problem, s)
            stuck = True
            for move, _, t, problem in self.moves(s):
                stuck = False
                if problem:
                    return failure(problem, s, move)
                t = self.canonical(t)
                if t not in parent:
                    parent[t] = (s, move)
                    queue.append(t)
            if stuck and (self.periodic or not self.is_end(s)):
                return failure("deadlock: every role waits", s)
        return Result(None, None, len(parent))

    def replay(self, moves):
        """Replay these moves from the start, without shifting, so that a trace shows absolute
        counts: their descriptions, the state reached and the last move's problem."""
        s, descriptions, problem = START, [], None
        for move in moves:
            ((description, s, problem),) = [(d, t, p) for m, d, t, p in self.moves(s) if m == move]
            descriptions.append(description)
        return descriptions, s, problem


def describe(result):
    return f"{result.problem}\n  " + "\n  ".join(result.trace)


def smallest_safe_guard(args, **model_options):
    """The smallest guard with which the explorer finds no overwrite (and no other problem)."""
    for guard in range(pql_threaded.overwrite_guard(args) + 1):
        problem = Model(args, guard=guard, **model_options).explore().problem
        assert problem is None or problem.startswith("overwrite"), problem
        if problem is None:
            return guard
    raise AssertionError(f"even overwrite_guard(args) = {pql_threaded.overwrite_guard(args)} is not safe for {args}")


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
WARMUPS = [0, 1, 2]
V_UPDATES_PER_ENV_STEP = [1, 2, 3, 8]
V_UPDATES_PER_P_UPDATE = [1, 2, 3]
RATIOS = [(vps, r) for vps in V_UPDATES_PER_ENV_STEP for r in V_UPDATES_PER_P_UPDATE]


@pytest.mark.parametrize("warmup", WARMUPS)
@pytest.mark.parametrize("vps, r", RATIOS)
def test_no_deadlock_and_the_ratios_hold(warmup, vps, r):
    """Every interleaving, in runs of any length and in runs of warm-up + 8 iterations: some role
    can always move (with a budget: until the end), and the counts keep the ratios."""
    args = make_args(warmup, vps, r)
    for budget in [None, warmup + 8]:
        result = Model(args, budget=budget, watch_reads=False).explore()
        assert result.problem is None, describe(result)


@pytest.mark.parametrize("vps, r", RATIOS)
def test_the_actor_never_overwrites_a_row_that_may_still_be_read(vps, r):
    """Every interleaving, with every read pending as long as InFlightLimit allows, in runs of any
    length, for the smallest capacity the script accepts and two larger ones."""
    args = make_args(1, vps, r)
    guard = pql_threaded.overwrite_guard(args)
    for capacity in [guard + 1, guard + 2, 2 * guard + 1]:
        result = Model(args, capacity=capacity).explore()
        assert result.problem is None, describe(result)


@pytest.mark.parametrize("vps, r", RATIOS)
def test_the_overwrite_check_can_fail(vps, r):
    """The check finds overwrites with a guard that is too small: with no guard at all, and with
    one row less than the smallest guard it accepts.

    overwrite_guard - 1 is NOT caught: with this writing's constants (ACTOR_LEAD_ITERATIONS 1,
    P_LAG_UPDATES 2, MAX_UPDATES_IN_FLIGHT 2) the smallest safe guard is 1 + ceil(4 r / vps),
    while overwrite_guard(args) is 3 + ceil(5 r / vps): the guard is conservative by at least 2
    rows (it counts the P-learner's lag as 5 r V-updates where at most 4 r - 1 fit, and adds
    2 rows more for the actor's lead than it needs). The worst case is a P-learner read, e.g. for
    vps = r = 1 and a guard of 4 (capacity 5): the P-learner chooses rows when one column is
    visible, then marks two updates while the V-learner and the actor run ahead, and the actor
    enqueues column 5 (ring slot 0) before the P-learner's third mark forces that read.
    """
    args = make_args(1, vps, r)
    no_guard = Model(args, guard=0).explore()
    assert no_guard.problem is not None and no_guard.problem.startswith("overwrite"), no_guard.problem
    smallest = smallest_safe_guard(args)
    assert 1 <= smallest <= pql_threaded.overwrite_guard(args)
    too_small = Model(args, guard=smallest - 1).explore()
    assert too_small.problem is not None and too_small.problem.startswith("overwrite")


@pytest.mark.parametrize("vps, r", [(1, 1), (3, 2)])
def test_runs_of_any_length_agree_with_a_bounded_run(vps, r):
    """A cross-check of the shift by whole periods: without it, in runs of 20 iterations, the
    explorer finds the same smallest safe guard."""
    args = make_args(1, vps, r)
    assert smallest_safe_guard(args, budget=20) == smallest_safe_guard(args)


def test_the_deadlock_check_can_fail(monkeypatch):
    """With P_LAG_UPDATES = 0 the V-learner waits for a P-update that waits for it: deadlock."""
    monkeypatch.setattr(pql_threaded, "P_LAG_UPDATES", 0)
    for budget in [None, 8]:
        result = Model(make_args(1, 1, 1), budget=budget, watch_reads=False).explore()
        assert result.problem is not None and result.problem.startswith("deadlock"), result.problem


def test_the_ratio_check_can_fail(monkeypatch):
    """An actor that never waits runs ahead of the V-learner by more than ACTOR_LEAD_ITERATIONS."""
    monkeypatch.setattr(pql_threaded.Coordinator, "actor_may_step", lambda self: True)
    result = Model(make_args(1, 2, 1), watch_reads=False).explore()
    assert result.problem is not None and result.problem.startswith("ratio: the actor leads"), result.problem


def test_a_count_wakes_only_the_roles_whose_rule_it_makes_true(monkeypatch):
    """The actor waits for the V-learner's updates of an earlier iteration: the V-updates before
    the last one it needs must not wake it (each needless wake-up takes the GIL from a role with
    work), and the last one must, at once rather than by the wait's timeout."""
    notified = []

    class RecordedCondition(threading.Condition):
        def notify_all(self):
            notified.append(self)
            super().notify_all()

    monkeypatch.setattr(pql_threaded.threading, "Condition", RecordedCondition)
    coordinator = pql_threaded.Coordinator(make_args(0, 8, 2))
    coordinator.iterations = 2 + pql_threaded.ACTOR_LEAD_ITERATIONS  # the actor needs the 16 V-updates of iterations 0 and 1
    result = []
    actor = threading.Thread(target=lambda: result.append(coordinator.wait_until(coordinator.actor_may_step)), daemon=True)
    actor.start()
    try:
        deadline = time.time() + 60.0  # generous: a loaded machine may start the thread late
        while coordinator.actor_may_step not in coordinator.wakeups:  # registered under the lock, which it then waits on
            assert actor.is_alive() and time.time() < deadline, "the actor never started waiting"
            time.sleep(0.001)
        actor_wakeup = coordinator.wakeups[coordinator.actor_may_step]
        for _ in range(15):
            coordinator.count("v_updates")
        assert actor_wakeup not in notified and actor.is_alive()
        coordinator.count("v_updates")
        assert notified.count(actor_wakeup) == 1  # woken by the count, not by the wait's 0.1 s timeout
        actor.join(timeout=60.0)
        assert result == [True]
    finally:
        coordinator.stop()  # a failed check must not leave the actor waiting
        actor.join(timeout=1.0)
