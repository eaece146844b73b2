"""pql_threaded.py: the roles in parallel on the CPU (threads without streams)."""
import contextlib
import glob
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.nn as nn
from test_pql import (
    REPO,
    interrupt_run,
    learned_mean_return,
    main_in_process,
    poison_env_step,
    read_scalars,
)

import pql_threaded

SMALL = ["--task", "Pendulum", "--num-envs", "16", "--hidden-dims", "32", "32", "--batch-size", "64",
         "--buffer-size", "16000", "--device", "cpu", "--warmup-iterations", "4"]


def run_threaded(args, cwd, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "pql_threaded.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_short_run_writes_scalars_checkpoint_and_holds_the_ratios(tmp_path):
    # 504 iterations: logged every 50, so each of the first 10 logged ratios is over 50 iterations
    # after warm-up; the 11th log is the run's last 4 iterations.
    result = run_threaded(SMALL + ["--total-timesteps", str(504 * 16), "--log-interval", "50",
                                   "--v-updates-per-env-step", "4", "--v-updates-per-p-update", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum__pql__1__*"))
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/v_updates_per_s",
                "losses/critic_loss", "losses/actor_loss", "losses/q_mean",
                "charts/v_updates_per_env_step", "charts/v_updates_per_p_update"]:
        assert scalars.get(tag), f"{tag} missing"
    assert [step for step, _ in scalars["charts/SPS"]] == [50 * 16 * i for i in range(1, 11)] + [504 * 16]
    v_per_step = [value for _, value in scalars["charts/v_updates_per_env_step"][:10]]
    v_per_p = [value for _, value in scalars["charts/v_updates_per_p_update"][:10]]
    assert len(v_per_step) == 10 and all(abs(r - 4) <= 0.4 for r in v_per_step), v_per_step
    assert all(abs(r - 3) <= 0.3 for r in v_per_p), v_per_p
    assert [value for _, value in scalars["charts/episodic_length"]] == [200.0] * 2
    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)
    assert checkpoint["global_step"] == 504 * 16 and {"actor", "critic", "critic_target", "obs_normalizer"} <= set(checkpoint)
    # The checkpoint's format is pql.py's: either script evaluates it.
    for script in ["pql_threaded.py", "pql.py"]:
        evaluation = subprocess.run([sys.executable, os.path.join(REPO, script), "--eval-checkpoint",
                                     os.path.join(run_dir, "model.pt"), "--eval-episodes", "2", "--device", "cpu"],
                                    cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert evaluation.returncode == 0 and "over 2 episodes" in evaluation.stdout, evaluation.stderr


INJECT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    import pql_threaded
    original, calls = pql_threaded.{function}, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 30:
            raise RuntimeError("injected failure in {function}")
        return original(*args, **kwargs)

    pql_threaded.{function} = failing
    sys.argv = ["pql_threaded.py", *{args!r}]
    sys.exit(pql_threaded.main())
''')


@pytest.mark.parametrize("function", ["update_critic", "update_actor"])
def test_an_exception_in_a_learner_thread_ends_the_process_with_its_traceback(tmp_path, function):
    code = INJECT.format(repo=REPO, function=function, args=SMALL + ["--total-timesteps", "100000000"])
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and f"RuntimeError: injected failure in {function}" in result.stderr
    assert f"in {function.replace('update_critic', 'v_learner').replace('update_actor', 'p_learner')}" in result.stderr
    assert time.time() - started < 60  # no hang (the budget is 1e8 steps)
    (checkpoint,) = glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))  # flushed on the way out
    assert torch.load(checkpoint, weights_only=False)["global_step"] > 0


@pytest.mark.parametrize("signal_to_send, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_and_exit_cleanly(tmp_path, signal_to_send, exit_code):
    returncode, err, global_step, seconds_to_exit = interrupt_run("pql_threaded.py", SMALL, tmp_path, signal_to_send)
    assert returncode == exit_code, err
    assert f"({signal_to_send.name}); saving" in err and "Traceback" not in err
    assert f"interrupted at env step {global_step} " in err and global_step > 0
    assert seconds_to_exit < 45  # the last log, the join, the save and the exit, with room for a loaded machine


@pytest.mark.parametrize("flags, message", [
    (["--sync-interval", "0"], "--sync-interval"),
    (["--actor-device", "cuda:5"], "--actor-device cuda:5"),
    (["--num-envs", "100", "--buffer-size", "500", "--batch-size", "64"], "--buffer-size"),  # 5 rows/env: all guarded
])
def test_bad_parallel_flags_fail_before_any_work(tmp_path, monkeypatch, capsys, flags, message):
    if "cuda:5" in flags and torch.cuda.device_count() > 5:
        pytest.skip("this machine has a cuda:5")
    monkeypatch.chdir(tmp_path)
    returncode, err = main_in_process(pql_threaded, ["--device", "cpu", *flags], monkeypatch, capsys)
    assert returncode == 2 and message in err
    assert not (tmp_path / "runs").exists()


def test_learns_pendulum(tmp_path):
    assert learned_mean_return("pql_threaded.py", [], tmp_path) > -400


POISON_CRITIC = textwrap.dedent('''
    import os
    import signal
    import sys
    import threading
    import torch
    sys.path.insert(0, {repo!r})
    import pql_threaded
    original_update, calls = pql_threaded.update_critic, [0]
    original_stop, stopped = pql_threaded.Coordinator.stop, threading.Event()

    def stop(coordinator, error=None):
        original_stop(coordinator, error)
        stopped.set()

    def poisoned(critic, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 30:  # SIGTERM comes; then, before the V-learner has stopped, its critic diverges
            os.kill(os.getpid(), signal.SIGTERM)
            stopped.wait(60)  # meanwhile the actor's loop stops, its last log sees only finite losses, and it stops the roles
            with torch.no_grad():
                next(critic.parameters()).fill_(float("nan"))
        return original_update(critic, *args, **kwargs)

    pql_threaded.Coordinator.stop = stop
    pql_threaded.update_critic = poisoned
    sys.argv = ["pql_threaded.py", *{args!r}]
    sys.exit(pql_threaded.main())
''')


def test_a_loss_that_turns_nonfinite_after_the_last_log_never_reaches_the_checkpoint(tmp_path):
    # SIGTERM during the critic's 30th update, which turns its loss non-finite once the actor's loop
    # has stopped, made its last log and told the roles to stop: no log saw the non-finite loss, so only the
    # look at the learners' counters after they stopped can keep it out of the final checkpoint.
    code = POISON_CRITIC.format(repo=REPO, args=SMALL + ["--total-timesteps", str(1000 * 16), "--log-interval", "1000"])
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert re.search(r"interrupted at env step \d+ \(SIGTERM\); saving", result.stderr), result.stderr
    assert "non-finite" in result.stderr and "checkpoint not updated" in result.stderr
    assert not glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))


def test_a_nonfinite_final_observation_stops_the_run_at_its_step(tmp_path, monkeypatch, capsys):
    """As in pql.py: a NaN in the true last observation of an ended episode (what the replay buffer
    stores) at iteration 13, during warm-up (nothing samples yet), stops the run with that step and
    keeps the checkpoint of iteration 10."""
    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    env = pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0)
    poison_env_step(env, "final_obs", from_iteration=14, once=True)
    args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=8000, warmup_iterations=20,
                             log_interval=5, save_interval=1e-9, total_timesteps=8 * 30)
    assert pql_threaded.train(args, env, None, (cpu, cpu, cpu)) == 1
    err = capsys.readouterr().err
    assert "non-finite observation or reward at env step 112 (iteration 13)" in err
    (checkpoint_path,) = glob.glob("runs/*/model.pt")
    assert torch.load(checkpoint_path, weights_only=False)["global_step"] == 10 * 8


def test_a_nonfinite_statistic_stops_the_run_before_it_is_logged(tmp_path, monkeypatch, capsys):
    """As in pql.py: a NaN return from an evaluation env is named at the next log and never written;
    the sums are checked as read, the values logged are the ones checked."""
    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    env = pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0)
    eval_env = pql_threaded.envs.make_env("Pendulum", 4, device=cpu, seed=10_000)
    poison_env_step(eval_env, "episode_return", from_iteration=14, once=True)
    args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=8000, warmup_iterations=20,
                             log_interval=5, save_interval=1e-9, total_timesteps=8 * 30)
    assert pql_threaded.train(args, env, eval_env, (cpu, cpu, cpu)) == 1
    assert "non-finite statistic (eval_return_sum) before env step 120" in capsys.readouterr().err
    (run_dir,) = glob.glob("runs/*")
    assert torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["global_step"] == 10 * 8
    assert all(math.isfinite(value) for series in read_scalars(run_dir).values() for _, value in series)


@pytest.mark.skipif(pql_threaded.torch_release() < (2, 5), reason="--compile needs torch 2.5 or newer")
def test_compile_compiles_in_the_main_thread_before_the_learners_start_and_leaves_no_trace(monkeypatch, tmp_path):
    """With --compile (and no CUDA graphs: on the CPU) both learner steps are compiled before the
    threads start, so that a stop signal never finds a learner inside a minute-long compile: the
    learners' threads compile nothing (TorchDynamo's count of compiled graphs stays as it was when
    they started), and the calls that compiled were put back (the networks, target and statistics as
    they start in a run without --compile). The backend is "eager": TorchDynamo's capture, in seconds."""
    from torch._dynamo.utils import counters

    monkeypatch.chdir(tmp_path)
    real_compile, real_start = torch.compile, threading.Thread.start
    monkeypatch.setattr(torch, "compile", lambda function, **options: real_compile(function, backend="eager"))
    at_start = {}

    def start(thread):
        if thread.name == "v-learner":  # the first learner to start: everything its thread will use, as it starts
            role_args = thread._args
            at_start["graphs"] = counters["stats"]["unique_graphs"]
            at_start["weights"] = [tensor.detach().clone() for tensor in [*role_args[11].parameters(), *role_args[12].parameters()]]
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    cpu, starts = torch.device("cpu"), []
    for compile_steps in [False, True]:
        torch.manual_seed(0)
        args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=4000, warmup_iterations=2,
                                 total_timesteps=8 * 12, log_interval=50, eval_envs=0, compile=compile_steps, exp_name=f"c{compile_steps}")
        assert pql_threaded.train(args, pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0), None, (cpu, cpu, cpu)) == 0
        starts.append(dict(at_start))
    assert counters["stats"]["unique_graphs"] == starts[1]["graphs"] > starts[0]["graphs"]  # compiled before, and only before
    assert all(torch.equal(a, b) for a, b in zip(starts[0]["weights"], starts[1]["weights"]))  # critic and target as without --compile


def test_the_periodic_checkpoint_refuses_nonfinite_snapshots(tmp_path):
    args = pql_threaded.Args(hidden_dims=(8,))
    cpu = torch.device("cpu")
    actor, critic = pql_threaded.Actor(3, 1, (8,)), pql_threaded.make_critic(3, 1, args)
    policy_mailbox = pql_threaded.Mailbox({"actor": actor}, cpu)
    critic_mailbox = pql_threaded.Mailbox({"critic": critic, "critic_target": critic}, cpu)
    normalizer = pql_threaded.ObsNormalizer(3, 5.0, cpu)
    path = str(tmp_path / "model.pt")
    assert pql_threaded.save_published_checkpoint(path, policy_mailbox, critic_mailbox, normalizer, args, 1)
    with torch.no_grad():
        actor.net[0].bias.fill_(float("nan"))
    policy_mailbox.publish({"actor": actor})
    assert not pql_threaded.save_published_checkpoint(path, policy_mailbox, critic_mailbox, normalizer, args, 2)
    assert torch.load(path, weights_only=False)["global_step"] == 1


STUCK_LEARNER = textwrap.dedent('''
    import sys
    import threading
    sys.path.insert(0, {repo!r})
    import pql_threaded
    original, calls = pql_threaded.update_actor, [0]

    def stuck(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 1:  # the first: the run gets here however slow the machine is
            threading.Event().wait()  # never returns, like a thread stuck on a hung GPU
        return original(*args, **kwargs)

    pql_threaded.update_actor = stuck
    sys.argv = ["pql_threaded.py", *{args!r}]
    sys.exit(pql_threaded.main())
''')


def test_a_learner_that_never_stops_is_named_and_the_process_exits_nonzero(tmp_path):
    """The actor waits for the V-learner, which waits for the stuck P-learner: the time budget
    still ends the run, and the shutdown names the role that did not stop instead of hanging."""
    code = STUCK_LEARNER.format(repo=REPO, args=SMALL + ["--total-timesteps", "100000000", "--max-time", "4"])
    started = time.time()
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "the p-learner did not stop" in result.stderr
    assert time.time() - started < 60


def test_a_run_that_ends_while_the_actor_waits_still_logs_its_last_iterations(tmp_path, monkeypatch):
    """With a slow V-learner the actor spends the run waiting for it, and --max-time runs out there,
    not after an env step: the iterations since the last log must be logged all the same, at the
    step the checkpoint holds."""
    monkeypatch.chdir(tmp_path)
    real_update_critic = pql_threaded.update_critic

    def slow_update_critic(*args, **kwargs):
        time.sleep(0.05)
        return real_update_critic(*args, **kwargs)

    monkeypatch.setattr(pql_threaded, "update_critic", slow_update_critic)
    args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=4000, warmup_iterations=2,
                             total_timesteps=10**8, max_time=3.0, log_interval=10**6, exp_name="waiting")
    cpu = torch.device("cpu")
    env = pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0)
    assert pql_threaded.train(args, env, None, (cpu, cpu, cpu)) == 0
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*waiting*"))
    global_step = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["global_step"]
    scalars = read_scalars(run_dir)
    assert global_step > 2 * 8 and [step for step, _ in scalars.get("charts/SPS", [])] == [global_step]
    assert scalars["losses/critic_loss"][0][1] > 0


def test_no_copy_toward_the_cpu_is_left_running_behind(tmp_path, monkeypatch):
    """A non-blocking copy from a GPU into CPU memory returns before the data has landed, so every
    copy whose destination is on the CPU must block. A whole run on the CPU checks every call."""
    nonblocking_to_cpu = []
    real_to, real_copy = torch.Tensor.to, torch.Tensor.copy_

    def to(self, *args, **kwargs):
        result = real_to(self, *args, **kwargs)
        if (kwargs.get("non_blocking") or args[2:3] == (True,)) and result.device.type == "cpu":
            nonblocking_to_cpu.append("Tensor.to")
        return result

    def copy_(self, src, non_blocking=False):
        if non_blocking and self.device.type == "cpu":
            nonblocking_to_cpu.append("Tensor.copy_")
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.chdir(tmp_path)
    args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=4000,
                             warmup_iterations=2, total_timesteps=8 * 60, log_interval=20, sync_interval=1)
    cpu = torch.device("cpu")
    env = pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0)
    assert pql_threaded.train(args, env, None, (cpu, cpu, cpu)) == 0
    assert nonblocking_to_cpu == []


def test_learners_draw_and_gather_their_samples_outside_the_lock(monkeypatch, tmp_path):
    """Only the copy of pos/size into a learner's window needs the coordinator's lock; drawing the
    rows and gathering them (most of a sample's torch calls) run without it, so the actor and the
    other learner are not held up."""
    monkeypatch.chdir(tmp_path)
    coordinators, lock_was_free = [], []
    real_sample_rows = pql_threaded.ReplayBuffer.sample_rows

    class RecordedCoordinator(pql_threaded.Coordinator):
        def __init__(self, args):
            super().__init__(args)
            coordinators.append(self)

    def try_the_lock_from_another_thread():
        # 10 s: a lock holder descheduled on a loaded machine is not a lock held; after a miss, no more waits
        acquired = coordinators[0].lock.acquire(timeout=10.0 if all(lock_was_free) else 0)
        if acquired:
            coordinators[0].lock.release()
        lock_was_free.append(acquired)

    def sample_rows(buffer, *args):
        other = threading.Thread(target=try_the_lock_from_another_thread)
        other.start()
        other.join()
        return real_sample_rows(buffer, *args)

    monkeypatch.setattr(pql_threaded, "Coordinator", RecordedCoordinator)
    monkeypatch.setattr(pql_threaded.ReplayBuffer, "sample_rows", sample_rows)
    args = pql_threaded.Args(task="Pendulum", num_envs=4, hidden_dims=(8,), batch_size=16, buffer_size=400, warmup_iterations=2,
                             total_timesteps=4 * 12, log_interval=50)
    cpu = torch.device("cpu")
    assert pql_threaded.train(args, pql_threaded.envs.make_env("Pendulum", 4, device=cpu, seed=0), None, (cpu, cpu, cpu)) == 0
    assert len(lock_was_free) >= 40 and all(lock_was_free)  # V- and P-learner samples alike


def test_the_learners_draw_from_generators_of_their_own(monkeypatch, tmp_path):
    """The learners' random numbers (RandomDraws) come from generators of their own: an env that
    reseeds torch's global generator at every step (mjlab's env swaps it out and back around each
    call, envs.PrivateTorchRng) changes none of them. Drawn from the global generator, a learner's
    draws would be rewound by such an env now and then, and an update would reuse a batch."""
    monkeypatch.chdir(tmp_path)
    real_draw, drawn = pql_threaded.RandomDraws.draw, []

    def draw(draws):
        real_draw(draws)
        drawn.append((draws.target_noise.numel() > 0, draws.env_index.clone(), draws.large_integer.clone(), draws.target_noise.clone()))

    monkeypatch.setattr(pql_threaded.RandomDraws, "draw", draw)
    args = pql_threaded.Args(task="Pendulum", num_envs=4, hidden_dims=(8,), batch_size=16, buffer_size=400, warmup_iterations=2,
                             total_timesteps=4 * 12, log_interval=50)
    cpu = torch.device("cpu")
    draws_by_learner = []
    for reseeding_env in [False, True]:
        env = pql_threaded.envs.make_env("Pendulum", 4, device=cpu, seed=0)
        if reseeding_env:
            def step(actions, real_step=env.step):
                result = real_step(actions)
                torch.manual_seed(0)
                return result
            env.step = step
        drawn.clear()
        torch.manual_seed(args.seed)
        assert pql_threaded.train(args, env, None, (cpu, cpu, cpu)) == 0
        draws_by_learner.append({learner: [sample for is_v, *sample in drawn if is_v == learner] for learner in (True, False)})
    for learner in (True, False):  # V-learner, P-learner
        plain, reseeded = (runs[learner] for runs in draws_by_learner)
        common = min(len(plain), len(reseeded))
        assert common >= 10
        for plain_draw, reseeded_draw in zip(plain[:common], reseeded[:common]):  # env indices, row ages, target noise
            assert all(torch.equal(a, b) for a, b in zip(plain_draw, reseeded_draw))


@pytest.mark.parametrize("train_fails", [False, True])
def test_training_runs_with_a_short_gil_switch_interval_and_puts_it_back(monkeypatch, tmp_path, train_fails):
    """The roles hand the GIL over around every torch call: the script shortens Python's switch
    interval for its training (GIL_SWITCH_INTERVAL), and leaves the process as it found it, also
    when training raises."""
    monkeypatch.chdir(tmp_path)
    seen = []

    def train(*args):
        seen.append(sys.getswitchinterval())
        if train_fails:
            raise RuntimeError("a failing run")
        return 0

    monkeypatch.setattr(pql_threaded, "train", train)
    before = sys.getswitchinterval()
    args = pql_threaded.Args(task="Pendulum", num_envs=4, hidden_dims=(8,), batch_size=16, buffer_size=400, device="cpu")
    with pytest.raises(RuntimeError) if train_fails else contextlib.nullcontext():
        assert pql_threaded.set_up_and_run(args) == 0
    assert seen == [pytest.approx(pql_threaded.GIL_SWITCH_INTERVAL)] and pql_threaded.GIL_SWITCH_INTERVAL < before
    assert sys.getswitchinterval() == before


# ---------------------------------------------------------------------------------------------
# The CUDA paths on a CPU-only machine: a stand-in for torch.cuda that records what is asked of it
# ---------------------------------------------------------------------------------------------
class FakeCuda:
    """Stands in for torch.cuda: devices, streams and events that keep a log instead of running.
    It follows PyTorch's documented semantics where the tests depend on them: entering
    `torch.cuda.stream(s)` makes s's device the thread's current device, `torch.cuda.device(d)`
    makes d current, and an event's synchronize() waits for the work recorded before it."""

    def __init__(self, monkeypatch, device_count=2):
        self.log, self.current_device, self.events_created = [], 0, 0
        self.default_streams = {index: self.Stream(self, index, "default") for index in range(device_count)}
        self.current_streams = dict(self.default_streams)
        fake = self
        for name, value in {
            "is_available": lambda: True,
            "device_count": lambda: device_count,
            "current_device": lambda: fake.current_device,
            "Stream": lambda device: fake.Stream(fake, torch.device(device).index, "new"),
            "Event": lambda **options: fake.Event(fake),
            "default_stream": lambda device=None: fake.default_streams[fake.index(device)],
            "current_stream": lambda device=None: fake.current_streams[fake.index(device)],
            "stream": lambda stream: fake.switch(stream=stream),
            "device": lambda device: fake.switch(device=fake.index(device)),
            "synchronize": lambda device=None: fake.log.append(("host waits for device", fake.index(device))),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def index(self, device):
        return self.current_device if device is None or torch.device(device).index is None else torch.device(device).index

    @contextlib.contextmanager
    def switch(self, stream=None, device=None):
        saved = self.current_device, dict(self.current_streams)
        if stream is not None:
            self.current_device, self.current_streams[stream.device_index] = stream.device_index, stream
        if device is not None:
            self.current_device = device
        try:
            yield
        finally:
            self.current_device, self.current_streams = saved

    class Stream:
        def __init__(self, cuda, device_index, kind):
            self.cuda, self.device_index, self.kind, self.work, self.finished = cuda, device_index, kind, 0, 0
            self.waited_for = []

        def wait_stream(self, other):
            self.waited_for.append(other)

        def wait_event(self, event):
            self.cuda.log.append(("stream waits for event", self, event))

        def synchronize(self):
            self.cuda.log.append(("host waits for stream", self))
            self.finished = self.work

    class Event:
        def __init__(self, cuda):
            cuda.events_created += 1
            self.cuda, self.stream, self.work = cuda, None, 0

        def record(self, stream):
            stream.work += 1  # each record stands for the work queued since the last one
            self.stream, self.work = stream, stream.work
            self.cuda.log.append(("record", stream, self))

        def synchronize(self):
            self.cuda.log.append(("host waits for event", self))
            if self.stream is not None:
                self.stream.finished = max(self.stream.finished, self.work)


def test_every_role_gets_a_cuda_device_with_an_index(monkeypatch):
    """`cuda` alone means whichever GPU is current in the thread that uses it, and entering a
    stream on another GPU changes that: every role's device gets its index before any work."""
    cuda = FakeCuda(monkeypatch, device_count=2)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)

    def roles(**flags):
        args = pql_threaded.Args(**flags)
        return pql_threaded.resolve_role_devices(args, pql_threaded.resolve_device(args.device))

    assert roles(device="auto", actor_device="cuda:0", v_learner_device="cuda:1") == (cuda0, cuda1, cuda0)  # docs/gpu.md's example
    assert roles(device="cuda", v_learner_device="cuda:1") == (cuda0, cuda1, cuda0)
    cuda.current_device = 1
    assert roles(device="cuda") == (cuda1, cuda1, cuda1)
    assert roles(device="cpu", p_learner_device="cuda") == (torch.device("cpu"), torch.device("cpu"), cuda1)
    with pytest.raises(ValueError, match="--p-learner-device cuda:2: only 2 CUDA device"):
        roles(device="cpu", p_learner_device="cuda:2")


def test_each_role_keeps_its_own_device_current_and_its_streams_wait_for_the_setup(monkeypatch):
    cuda = FakeCuda(monkeypatch, device_count=2)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    for own, other in [(cuda0, cuda1), (cuda1, cuda0), (cuda0, cuda0)]:  # e.g. the P-learner and the buffer's GPU
        with pql_threaded.role_streams(own, other):
            assert cuda.current_device == own.index
            for device in {own, other}:
                stream = cuda.current_streams[device.index]
                assert stream.kind == "new"  # the role's own stream, not the default one
                # The networks and snapshots were made on the default stream before the roles started.
                assert stream.waited_for == [cuda.default_streams[device.index]]
        assert cuda.current_streams == cuda.default_streams and cuda.current_device == 0


def test_the_actor_keeps_its_default_stream_for_its_simulator(monkeypatch):
    """A simulator with GPU work of its own (mjlab's Warp queues its physics on a stream that
    synchronises with the default stream only) expects torch's work on the default stream: the actor
    keeps it on its own GPU, and takes a stream of its own only on another GPU (the replay buffer's)."""
    cuda = FakeCuda(monkeypatch, device_count=2)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    with pql_threaded.role_streams(cuda0, cuda0, keep_default_stream=True):
        assert cuda.current_device == 0 and cuda.current_streams[0] is cuda.default_streams[0]
    with pql_threaded.role_streams(cuda0, cuda1, keep_default_stream=True):
        assert cuda.current_device == 0 and cuda.current_streams[0] is cuda.default_streams[0]
        assert cuda.current_streams[1].kind == "new" and cuda.current_streams[1].waited_for == [cuda.default_streams[1]]
    assert cuda.current_streams == cuda.default_streams


def test_train_keeps_the_actor_and_only_the_actor_on_the_default_stream(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls, real_role_streams = [], pql_threaded.role_streams

    def role_streams(*devices, **options):
        calls.append((threading.current_thread().name, options.get("keep_default_stream", False)))
        return real_role_streams(*devices, **options)

    monkeypatch.setattr(pql_threaded, "role_streams", role_streams)
    args = pql_threaded.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=4000,
                             warmup_iterations=2, total_timesteps=8 * 10, log_interval=5)
    cpu = torch.device("cpu")
    assert pql_threaded.train(args, pql_threaded.envs.make_env("Pendulum", 8, device=cpu, seed=0), None, (cpu, cpu, cpu)) == 0
    assert sorted(calls) == [("MainThread", True), ("p-learner", False), ("v-learner", False)]


def test_in_flight_limit_reuses_a_fixed_ring_of_events(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    limit = pql_threaded.InFlightLimit(torch.device("cuda", 0), limit=2)
    stream = cuda.current_streams[0]
    for _ in range(10):
        limit.mark()
        assert stream.work - stream.finished <= 2  # at most two updates queued after each mark
    assert cuda.events_created == 2
    assert not any(entry[0] == "host waits for stream" for entry in cuda.log)


def test_mailbox_hands_snapshots_over_with_events_and_no_host_waits(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    copies = []
    real_copy_weights = pql_threaded.copy_weights
    monkeypatch.setattr(pql_threaded, "copy_weights", lambda src, dst: (copies.append(dst), real_copy_weights(src, dst)))
    owner, reader_a, reader_b = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    mailbox = pql_threaded.Mailbox({"net": owner}, torch.device("cuda", 0))  # tensors stay on the CPU here
    mailbox.publish({"net": owner})
    assert mailbox.fetch("net", reader_a, -1) == 1 and mailbox.fetch("net", reader_b, -1) == 1
    assert mailbox.fetch("net", reader_a, 1) == 1  # nothing new: no copy
    assert torch.equal(reader_a.weight, owner.weight) and torch.equal(reader_b.weight, owner.weight)
    with torch.no_grad():
        owner.weight.add_(1.0)
    cuda.log.clear()
    mailbox.publish({"net": owner})
    # Before overwriting the snapshot the owner's stream waits for both readers' copies, then marks its own.
    waited = [entry[2] for entry in cuda.log if entry[0] == "stream waits for event"]
    assert sorted(map(id, waited)) == sorted(map(id, mailbox.finished_reading.values())) and len(waited) == 2
    assert len(copies) == 4
    assert cuda.log[-1][0] == "record" and cuda.log[-1][2] is mailbox.published
    cuda.log.clear()
    assert mailbox.fetch("net", reader_a, 1) == 2
    assert [entry[0] for entry in cuda.log] == ["stream waits for event", "record"]
    assert cuda.log[0][2] is mailbox.published  # the reader's stream waits for the publish before copying
    assert torch.equal(reader_a.weight, owner.weight)
    assert not any(entry[0].startswith("host waits") for entry in cuda.log)


# ---------------------------------------------------------------------------------------------
# A lagging GPU, played on the CPU: every learner's read lands as late as the in-flight limit allows
# ---------------------------------------------------------------------------------------------
def run_with_lagging_reads(monkeypatch, tmp_path, guard_for, v_updates_per_env_step, iterations=100):
    """Train with real threads, and check each sample's rows as late as a GPU could read them.

    Every column of the replay buffer is stamped with the iteration that wrote it, at the moment
    the actor enqueues the write (the earliest a GPU could run it). A learner's rows are noted with
    their stamps when it chooses them; on a GPU its read of them may still be pending until the
    same learner marks MAX_UPDATES_IN_FLIGHT more updates (InFlightLimit's promise), so that is
    when the stamps are compared: a changed stamp is a row overwritten between sampling and reading.
    Returns the number of such rows and the number of samples checked.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pql_threaded, "overwrite_guard", guard_for)
    stamps, pending, overwritten, checked = {}, threading.local(), [0], [0]
    real_add, real_fill_window, real_sample_rows, real_mark = (
        pql_threaded.ReplayBuffer.add, pql_threaded.ReplayBuffer.fill_window, pql_threaded.ReplayBuffer.sample_rows,
        pql_threaded.InFlightLimit.mark)

    def add(buffer, *transition):  # under the coordinator's lock, like the real write
        stamps.setdefault("columns", torch.full((buffer.num_envs, buffer.capacity), -1))[:, buffer.pos] = stamps.get("next", 0)
        stamps["next"] = stamps.get("next", 0) + 1
        real_add(buffer, *transition)

    def fill_window(buffer, window):  # under the lock too: the rows a sample may draw are fixed here
        real_fill_window(buffer, window)
        pending.stamps_at_fill = stamps["columns"].clone()

    def sample_rows(buffer, draws, window):  # the rows drawn, with their stamps when the window was filled
        env_index, start, age = real_sample_rows(buffer, draws, window)
        pending.chosen = (env_index, start, pending.stamps_at_fill[env_index, start])
        return env_index, start, age

    def mark(in_flight):
        queue = pending.__dict__.setdefault("queue", [])
        queue.append(pending.chosen)
        if len(queue) > pql_threaded.MAX_UPDATES_IN_FLIGHT:  # the read of this sample must have landed by now
            env_index, start, stamp = queue.pop(0)
            overwritten[0] += int((stamps["columns"][env_index, start] != stamp).sum())
            checked[0] += 1
        time.sleep(random.random() * 1e-3)  # shuffle the threads' interleaving
        real_mark(in_flight)

    monkeypatch.setattr(pql_threaded.ReplayBuffer, "add", add)
    monkeypatch.setattr(pql_threaded.ReplayBuffer, "fill_window", fill_window)
    monkeypatch.setattr(pql_threaded.ReplayBuffer, "sample_rows", sample_rows)
    monkeypatch.setattr(pql_threaded.InFlightLimit, "mark", mark)
    args = pql_threaded.Args(task="Pendulum", num_envs=4, hidden_dims=(8,), batch_size=64, warmup_iterations=2,
                             v_updates_per_env_step=v_updates_per_env_step, v_updates_per_p_update=2,
                             total_timesteps=4 * iterations, log_interval=50)
    # The smallest buffer the script accepts: one sampleable row per env, the newest, which the
    # actor overwrites after guard + 1 more writes, the fewest the guard allows.
    args.buffer_size = 4 * (pql_threaded.overwrite_guard(args) + 1)
    cpu = torch.device("cpu")
    env = pql_threaded.envs.make_env("Pendulum", 4, device=cpu, seed=0)
    assert pql_threaded.train(args, env, None, (cpu, cpu, cpu)) == 0
    return overwritten[0], checked[0]


@pytest.mark.parametrize("v_updates_per_env_step", [1, 8])
def test_no_row_is_overwritten_between_being_sampled_and_being_read(monkeypatch, tmp_path, v_updates_per_env_step):
    real_guard = pql_threaded.overwrite_guard
    overwritten, checked = run_with_lagging_reads(monkeypatch, tmp_path, real_guard, v_updates_per_env_step)
    assert checked > 50 and overwritten == 0


def test_the_lagging_read_check_catches_a_guard_that_is_too_small(monkeypatch, tmp_path):
    overwritten, checked = run_with_lagging_reads(monkeypatch, tmp_path, lambda args: 0, v_updates_per_env_step=1)
    assert checked > 50 and overwritten > 0
