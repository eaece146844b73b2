"""benchmarks/gpu_check.py: its tiny CPU mode end to end, its bad flags, and its verdicts on synthetic logs.

The end-to-end test trains 4 toy runs in subprocesses (half a minute or so on 2 cores); the
verdict tests feed summarize() and main() made-up scalars instead of training.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402

RUN_ROWS = [("pql.py", "scalar"), ("pql.py", "distributional"), ("pql_threaded.py", "scalar"), ("pql_threaded.py", "distributional")]


def run_check(*args, timeout=240):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def table_row(out, *first_cells):
    """The cells of the one Markdown table row that starts with first_cells."""
    start = "| " + " | ".join(first_cells) + " |"
    rows = [line for line in out.splitlines() if line.startswith(start)]
    assert len(rows) == 1, f"{start!r} in:\n{out}"
    return [cell.strip() for cell in rows[0].split("|")[1:-1]]


def test_tiny_cpu_check_passes_and_prints_every_row(tmp_path):
    result = run_check("--device", "cpu", "--tiny", "--logdir", tmp_path)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "torch " + torch.__version__ in out and "--device cpu --tiny" in out  # the header
    for script, critic in RUN_ROWS:
        cells = table_row(out, script, critic)
        exit_code, env_steps_per_s, v_per_env_step, finite, eval_return, ok = (cells[i] for i in (3, 5, 7, 9, 10, 11))
        assert (exit_code, finite, ok) == ("0", "yes", "yes"), cells
        assert float(env_steps_per_s.replace(",", "")) > 0
        assert float(v_per_env_step) == pytest.approx(8, rel=0.15)  # the scripts' default ratio
        assert math.isfinite(float(eval_return)) and float(eval_return) < 0  # Pendulum's returns are negative
        assert list((tmp_path / f"{script[:-3]}-{critic}" / "runs").glob("*/model.pt"))
    for task in ["Pendulum", "CartpoleSwingup", "Reacher"]:
        cells = table_row(out, task, "cpu vs cpu")
        assert cells[2] == "300" and cells[-1] == "yes" and float(cells[3]) == 0.0, cells
    assert "Multi-GPU placement runs" in out and "skipped, --device cpu" in out
    assert "CUDA graphs (--no-cuda-graphs runs, and 16 V-updates replayed against eager ones): skipped, --device cpu" in out
    assert out.rstrip().endswith("All checks passed.")


def test_bad_flags_fail_before_any_work_naming_the_flag(tmp_path):
    result = run_check("--iterations", "0", "--logdir", tmp_path / "logs")
    assert result.returncode == 2 and "--iterations" in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()  # nothing was run
    result = run_check("--tiny", "--num-envs", "-3", "--logdir", tmp_path / "logs")
    assert result.returncode == 2 and "--num-envs" in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_fails_naming_the_device(tmp_path):
    result = run_check("--device", "cuda", "--logdir", tmp_path / "logs")
    assert result.returncode == 2 and "--device cuda" in result.stderr and "CUDA is not available" in result.stderr, result.stderr
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------
# Verdicts on synthetic logs: no training
# ---------------------------------------------------------------------------------------------
NUM_ENVS = 100


def synthetic_scalars(loss=0.5, threaded=False):
    """Logged every 10 iterations of 100 envs: 1000 env steps/s and 8 V-updates per env step after
    a warm-up of 10 iterations (1 s); the last point's losses are `loss`."""
    steps = [1000, 2000, 3000, 4000]
    seconds = [1.0, 2.0, 3.0, 4.0]
    v_updates = [0, 80, 160, 240]
    scalars = {
        "charts/SPS": [(s, s / t) for s, t in zip(steps, seconds)],
        "charts/v_updates_per_s": [(s, v / t) for s, v, t in zip(steps, v_updates, seconds)],
    }
    for tag in gpu_check.LOSS_TAGS:
        scalars[tag] = [(2000, 0.1), (3000, 0.2), (4000, loss)]
    if threaded:
        scalars["charts/v_updates_per_env_step"] = [(2000, 0.0), (3000, 8.0), (4000, 7.0)]  # the first: the actor's head start
        scalars["charts/v_updates_per_p_update"] = [(2000, 3.0), (3000, 2.0), (4000, 2.0)]
    return scalars


def test_rates_come_from_the_last_two_points_and_ratios_as_documented():
    row = gpu_check.summarize(gpu_check.Run("pql.py"), synthetic_scalars(), NUM_ENVS, 0, -150.0, None)
    assert row["failures"] == [] and row["losses_finite"] is True
    assert row["env_steps_per_s"] == pytest.approx(1000) and row["v_updates_per_s"] == pytest.approx(80)
    assert row["v_per_env_step"] == pytest.approx(8) and row["v_per_p_update"] == "2 (configured)"
    run = gpu_check.Run("pql_threaded.py", "distributional")
    row = gpu_check.summarize(run, synthetic_scalars(threaded=True), NUM_ENVS, 0, -150.0, None)
    assert row["failures"] == []
    assert row["v_per_env_step"] == pytest.approx(7.5) and row["v_per_p_update"] == pytest.approx(2.0)  # the first point left out


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_loss_fails_the_run(loss, capsys):
    run = gpu_check.Run("pql_threaded.py")
    row = gpu_check.summarize(run, synthetic_scalars(loss, threaded=True), NUM_ENVS, 0, -150.0, None)
    assert row["losses_finite"] is False
    assert "losses/critic_loss is not finite at env step 4,000" in row["failures"]
    failures = gpu_check.all_failures([row], [])
    assert len(failures) == len(gpu_check.LOSS_TAGS) and failures[0].startswith("pql_threaded.py scalar: losses/")
    gpu_check.print_runs_table([row], "cpu", NUM_ENVS, 30)
    cells = table_row(capsys.readouterr().out, "pql_threaded.py", "scalar")
    assert cells[9] == "NO" and cells[-1] == "NO"


def test_exit_code_missing_logs_and_failed_evaluation_fail_the_run():
    run = gpu_check.Run("pql.py")
    row = gpu_check.summarize(run, {}, NUM_ENVS, None, None, "no checkpoint")
    assert "timed out (see --timeout)" in row["failures"]
    assert any("charts/SPS" in failure for failure in row["failures"])
    assert "losses/actor_loss was never logged" in row["failures"]
    assert "evaluation of the checkpoint: no checkpoint" in row["failures"]
    row = gpu_check.summarize(run, synthetic_scalars(), NUM_ENVS, 1, float("nan"), None)
    assert row["failures"] == ["exit code 1", "evaluation of the checkpoint: mean return nan"]


def test_env_disagreement_and_env_errors_fail():
    good = dict(task="Reacher", device="cuda", steps=300, checked_obs=3e-6, checked_reward=1e-7, all_obs=2e-3,
                all_reward=1e-4, ok=True, error=None)
    assert gpu_check.env_failures(good) == []  # late-episode drift alone is only reported
    assert "differ by more than 0.0001" in gpu_check.env_failures(dict(good, checked_obs=0.3, ok=False))[0]
    assert "RuntimeError: boom" in gpu_check.env_failures(dict(good, ok=False, error="RuntimeError: boom"))[0]
    row = gpu_check.compare_envs("Pendulum", "cpu", 25)  # the real comparison, CPU against itself
    assert row["ok"] and row["error"] is None and row["all_obs"] == 0.0


def test_main_exits_1_and_lists_the_failed_runs(monkeypatch, tmp_path, capsys):
    """main() on made-up outcomes: one run logged a NaN loss, so the exit code is 1 and it is named."""
    def fake_check_run(run, device, num_envs, *rest):
        loss = float("nan") if run.critic == "distributional" and run.script == "pql.py" else 0.5
        row = gpu_check.summarize(run, synthetic_scalars(loss, threaded=run.script == "pql_threaded.py"), NUM_ENVS, 0, -150.0, None)
        row["log"] = str(tmp_path / "train.log")
        return row

    (tmp_path / "train.log").write_text("the last lines of a log\n")
    monkeypatch.setattr(gpu_check, "check_run", fake_check_run)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--env-steps", "3", "--logdir", str(tmp_path)])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    assert "- pql.py distributional: losses/critic_loss is not finite at env step 4,000" in out
    assert table_row(out, "pql.py", "distributional")[-1] == "NO" and table_row(out, "pql.py", "scalar")[-1] == "yes"
    assert "FAILED: 3 check(s)" in out and "the last lines of a log" in out


def test_a_run_past_the_timeout_is_stopped_and_its_output_kept(tmp_path):
    command = [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(120)"]
    code, output, seconds = gpu_check.execute(command, tmp_path, tmp_path / "train.log", timeout=5, tiny=False)
    assert code is None and "started" in output and seconds < 60
    assert "started" in (tmp_path / "train.log").read_text()
    row = gpu_check.summarize(gpu_check.Run("pql.py"), synthetic_scalars(), NUM_ENVS, code, -150.0, None)
    assert row["failures"] == ["timed out (see --timeout)"]
