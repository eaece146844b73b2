"""pql_threaded.py: the roles in parallel on the CPU (threads without streams)."""
import glob
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from test_pql import REPO, interrupt_run, learned_mean_return, read_scalars

SMALL = ["--task", "Pendulum", "--num-envs", "16", "--hidden-dims", "32", "32", "--batch-size", "64",
         "--buffer-size", "16000", "--device", "cpu", "--warmup-iterations", "4"]


def run_threaded(args, cwd, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "pql_threaded.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_short_run_writes_scalars_checkpoint_and_holds_the_ratios(tmp_path):
    # 1004 iterations: logged every 100, so each logged ratio is over 100 iterations after warm-up.
    result = run_threaded(SMALL + ["--total-timesteps", str(1004 * 16), "--log-interval", "100",
                                   "--v-updates-per-env-step", "4", "--v-updates-per-p-update", "3"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum__pql__1__*"))
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/v_updates_per_s",
                "losses/critic_loss", "losses/actor_loss", "losses/q_mean",
                "charts/v_updates_per_env_step", "charts/v_updates_per_p_update"]:
        assert scalars.get(tag), f"{tag} missing"
    v_per_step = [value for _, value in scalars["charts/v_updates_per_env_step"]]
    v_per_p = [value for _, value in scalars["charts/v_updates_per_p_update"]]
    assert len(v_per_step) == 10 and all(abs(r - 4) <= 0.4 for r in v_per_step), v_per_step
    assert all(abs(r - 3) <= 0.3 for r in v_per_p), v_per_p
    assert [value for _, value in scalars["charts/episodic_length"]] == [200.0] * 5
    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)
    assert checkpoint["global_step"] == 1004 * 16 and {"actor", "critic", "critic_target", "obs_normalizer"} <= set(checkpoint)
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


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    returncode, err, global_step = interrupt_run("pql_threaded.py", SMALL, tmp_path)
    assert returncode == 130, err
    assert "interrupted at env step" in err and "Traceback" not in err
    assert global_step is not None and global_step > 0


@pytest.mark.parametrize("flags, message", [
    (["--sync-interval", "0"], "--sync-interval"),
    (["--actor-device", "cuda:5"], "--device cuda:5"),
    (["--num-envs", "100", "--buffer-size", "500", "--batch-size", "64"], "--buffer-size"),  # 5 rows/env: all guarded
])
def test_bad_parallel_flags_fail_before_any_work(tmp_path, flags, message):
    if "cuda:5" in flags and torch.cuda.device_count() > 5:
        pytest.skip("this machine has a cuda:5")
    result = run_threaded(["--device", "cpu", *flags], tmp_path, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_learns_pendulum(tmp_path):
    assert learned_mean_return("pql_threaded.py", [], tmp_path) > -400
