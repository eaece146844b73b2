"""The benchmark scripts keep working: each runs its quick mode with a tiny budget in a subprocess.

No timing is asserted; only that each script finishes, prints its table with the expected rows,
and that the figures are written. Needs benchmarks/requirements.txt (rsl-rl-lib, matplotlib).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCH)


@pytest.fixture(scope="module", autouse=True)
def shared_ray(ray_address):
    """Every benchmark script run here connects to the session's Ray instance (conftest.py)."""
    return ray_address


def run_script(name, *args, timeout=300):
    result = subprocess.run([sys.executable, os.path.join(BENCH, name), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def table_rows(out, first_cell):
    return [line for line in out.splitlines() if line.startswith(f"| {first_cell}")]


@pytest.fixture(scope="module")
def learning_logs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("learning")
    out = run_script("learning_curves.py", "--quick", "--tasks", "Reacher", "--max-time", "4", "--logdir", logdir)
    return logdir, out


@pytest.fixture(scope="module")
def scaling_logs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("scaling")
    out = run_script("scaling.py", "--quick", "--num-envs", "16", "64", "--logdir", logdir)  # the smallest sizes: seconds
    return logdir, out


def test_ppo_adapter_reports_time_limits_as_time_outs():
    from ppo import RslRlVecEnv

    import envs
    env = envs.make_env("Pendulum", 4, device="cpu", seed=0)
    vec_env = RslRlVecEnv(env, reward_scale=0.5)
    assert vec_env.num_envs == 4 and vec_env.num_actions == 1 and vec_env.max_episode_length == 200
    assert vec_env.get_observations()["policy"].shape == (4, 3)
    raw_return = torch.zeros(4)
    for t in range(1, 201):
        obs, reward, dones, extras = vec_env.step(torch.zeros(4, 1))
        raw_return += reward / 0.5
        assert obs["policy"].shape == (4, 3)
        assert bool((dones == 1).all()) == (t == 200) and bool((dones == 0).all()) == (t < 200)
        assert torch.equal(extras["time_outs"], dones.bool())  # the built-in tasks only truncate
    assert vec_env.episodes.item() == 4
    assert vec_env.return_sum.item() == pytest.approx(raw_return.sum().item(), rel=1e-4)
    assert int(vec_env.episode_length_buf.max()) == 0  # all reset together


def test_ppo_final_evaluation_runs_the_policys_mean_action_one_episode_per_env():
    import ppo
    from rsl_rl.runners import OnPolicyRunner

    import envs
    # The runner's inference policy, the one ppo.py evaluates, gives the mean action: the same twice,
    # unlike the sampled actions of training.
    vec_env = ppo.RslRlVecEnv(envs.make_env("Pendulum", 4, device="cpu", seed=0))
    runner = OnPolicyRunner(vec_env, ppo.train_cfg([8], ppo.parse_args([])), log_dir=None, device="cpu")
    policy, obs = runner.get_inference_policy("cpu"), vec_env.get_observations()
    assert torch.equal(policy(obs), policy(obs)) and not torch.equal(policy(obs, stochastic_output=True), policy(obs))
    # The returns and lengths against stepping the same seeded envs by hand with the same (constant) action.
    returns, lengths = ppo.evaluate_deterministic(lambda td: torch.full((td.batch_size[0], 1), 0.3), "Pendulum", 3, "cpu", seed=7)
    reference, by_hand = envs.make_env("Pendulum", 3, device="cpu", seed=7), torch.zeros(3)
    reference.reset()
    for _ in range(200):
        _, reward, _, _, _ = reference.step(torch.full((3, 1), 0.3))
        by_hand += reward
    assert torch.allclose(returns, by_hand, rtol=1e-4) and torch.equal(lengths, torch.full((3,), 200.0))
    assert len(set(returns.tolist())) == 3  # three different starts


def test_learning_curves_quick(learning_logs):
    logdir, out = learning_logs
    for label in ["pql.py", "pql_threaded.py", "PPO (rsl_rl)"]:
        rows = table_rows(out, "Reacher (-8) | " + label + " |")
        assert len(rows) == 1, out
    assert "Machine:" in out and "| Reacher | " in out, out  # the machine line and the ratios' row
    # ppo.py ends with its final policy's mean action on 10 fresh envs, logged once at its last step.
    from solve_times import read_scalars
    (ppo_run,) = (logdir / "runs").glob("Reacher__ppo__1__*")
    (final_eval,) = read_scalars(str(ppo_run), "eval/episodic_return")
    assert final_eval[0] == read_scalars(str(ppo_run), "charts/SPS")[-1][0] and final_eval[1] < 0
    again = run_script("learning_curves.py", "--no-run", "--logdir", logdir)
    assert table_rows(again, "Reacher (-8)") == table_rows(out, "Reacher (-8)")
    # Resuming: a run missing from done.json (as if the grid had stopped during it) runs again, in
    # place of its unfinished folder; the finished ones do not.
    done = json.loads((logdir / "done.json").read_text())
    assert sorted(done) == ["Reacher__ppo__1", "Reacher__pql__1", "Reacher__pql_threaded__1"]
    del done["Reacher__ppo__1"]
    (logdir / "done.json").write_text(json.dumps(done))
    resumed = run_script("learning_curves.py", "--quick", "--tasks", "Reacher", "--max-time", "4", "--logdir", logdir)
    assert [line.split(" seed")[0] for line in resumed.splitlines() if line.startswith("# ")] == ["# Reacher PPO (rsl_rl)"], resumed
    assert len(list((logdir / "runs").glob("Reacher__ppo__1__*"))) == 1
    assert len(json.loads((logdir / "done.json").read_text())) == 3


def test_scaling_quick(scaling_logs):
    _, out = scaling_logs
    for script in ["pql.py", "pql_threaded.py"]:
        rows = [row.split("|")[1:-1] for row in table_rows(out, script + " ")]
        assert [row[1].strip() for row in rows] == ["16", "64"], out
        assert [row[2].strip() for row in rows] == ["256", "512"], out  # batch 64 * sqrt(envs)
        assert rows[0][-1].strip() == "1.0x"  # the cost per iteration relative to the fewest envs
        for row in rows:
            assert float(row[5].replace(",", "")) > 0 and float(row[6]) > 0  # env steps/s, V-updates/s


def test_plots(learning_logs, scaling_logs, tmp_path):
    out = run_script("plots.py", "--learning-logdir", learning_logs[0], "--scaling-logdir", scaling_logs[0], "--out", tmp_path)
    for name in ["learning_Reacher.png", "scaling.png"]:
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out


def test_solve_times_quick_and_resumed(tmp_path):
    out = run_script("solve_times.py", "--quick", "--tasks", "Reacher", "--variants", "pql.py", "--resume-dir", tmp_path)
    assert len(table_rows(out, "Reacher | `pql.py` | 1 |")) == 1, out
    again = run_script("solve_times.py", "--quick", "--tasks", "Reacher", "--variants", "pql.py", "--resume-dir", tmp_path)
    assert "# Reacher" not in again and table_rows(again, "Reacher") == table_rows(out, "Reacher")  # nothing ran twice


def test_plot_band_is_the_mean_min_and_max_over_the_range_all_seeds_cover():
    import numpy as np
    from plots import band

    xs = [np.array([0.0, 10.0]), np.array([2.0, 6.0, 12.0])]
    ys = [np.array([0.0, 10.0]), np.array([4.0, 0.0, 6.0])]
    grid, mean, low, high = band(xs, ys, log_x=False)
    assert grid[0] == 2.0 and grid[-1] == 10.0  # the range both seeds cover
    for x, m, lo, hi in zip(grid, mean, low, high):
        first = x  # the line through (0, 0) and (10, 10)
        second = 6 - x if x <= 6 else x - 6  # through (2, 4), (6, 0) and (12, 6)
        assert m == pytest.approx((first + second) / 2) and lo == pytest.approx(min(first, second))
        assert hi == pytest.approx(max(first, second))
    # One seed logged a single return: no common range, so no mean that would leave it out.
    assert band([np.array([64000.0]), np.array([64000.0, 128000.0])], [np.array([1.0]), np.array([2.0, 3.0])], True) is None


@pytest.mark.parametrize("name", ["learning_curves.py", "scaling.py"])
def test_no_run_without_logs_names_the_flag(name, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(BENCH, name), "--no-run", "--logdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--no-run: no runs in" in result.stderr, result.stderr


def test_seed_sweep_quick_records_each_run_once_and_resumes(tmp_path):
    results = tmp_path / "sweep.jsonl"
    tiny = ["--quick", "--variants", "pql.py", "--results", results, "--extra=--hidden-dims 8 --batch-size 64"]
    out = run_script("seed_sweep.py", *tiny)
    (row,) = table_rows(out, "defaults | `pql.py` |")
    assert "| 0/1 |" in row or "| 1/1 |" in row, out  # one seed, solved or not, with its deterministic return
    (line,) = results.read_text().splitlines()
    run = json.loads(line)
    assert run["task"] == "Pendulum" and run["seed"] == 1 and run["budget"] == 64 * 210 and -2000 < run["deterministic_return"] < 0
    again = run_script("seed_sweep.py", *tiny)
    assert "# defaults" not in again and len(results.read_text().splitlines()) == 1  # resumed: nothing ran twice
    assert table_rows(again, "defaults | `pql.py` |") == [row]


def test_run_grid_reports_each_run_as_it_ends_and_raises_a_runs_error():
    import grid

    ended = []
    results = grid.run_grid([(n, pow, (n, 2)) for n in range(3)], on_done=lambda key, result: ended.append((key, result)))
    assert results == {0: 0, 1: 1, 2: 4} and sorted(ended) == [(0, 0), (1, 1), (2, 4)]
    with pytest.raises(ValueError, match="invalid literal"):  # the run's own exception, raised in the driver
        grid.run_grid([("bad", lambda: int("not a number"), ())])


def test_run_grid_refuses_runs_that_fit_no_node_naming_the_flag():
    import grid

    with pytest.raises(SystemExit, match="--cpus-per-run 1000"):
        grid.run_grid([(1, pow, (1, 2))], cpus_per_run=1000)
    with pytest.raises(SystemExit, match="--gpus-per-run 1000"):  # as --device cuda on a machine without a GPU
        grid.run_grid([(1, pow, (1, 2))], gpus_per_run=1000)


def test_run_grid_without_ray_names_the_install_command(monkeypatch):
    import grid

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(SystemExit, match="pip install -r benchmarks/requirements.txt"):
        grid.run_grid([(1, pow, (1, 2))])
    assert grid.run_grid([]) == {}  # nothing to run (a finished grid resumed): no Ray needed


def test_grid_done_persists_the_finished_runs_of_a_folder(tmp_path):
    import grid

    done = grid.Done(tmp_path)
    assert "a" not in done
    done.add("a", "python pql.py --seed 1")
    again = grid.Done(tmp_path)  # a later invocation: resumes with what finished
    assert "a" in again and again.runs == {"a": "python pql.py --seed 1"} and not (tmp_path / "done.json.tmp").exists()


def test_seed_sweep_table_counts_a_seed_solved_only_if_its_deterministic_policy_is(tmp_path):
    from seed_sweep import table

    def run(seed, training_steps, deterministic_steps, final):
        return dict(label="x", variant="pql.py", budget=100, seed=seed, steps_to_solve=training_steps,
                    deterministic_steps_to_solve=deterministic_steps, deterministic_return=final)

    rows = table([run(1, 40, 30, -150.0), run(2, None, 60, -190.0), run(3, 50, 50, -250.0), run(4, None, None, -800.0),
                  run(5, 80, 70, -160.0), run(6, 90, None, -180.0)])
    (row,) = [line for line in rows.splitlines() if line.startswith("| x |")]
    # Solved: the seeds whose final policy scores >= -200: 1, 2, 5 and 6. Seed 2 counts although its
    # noisy training return never reached -200; seed 3 reached it in training but its final policy
    # scores -250. Steps to solve: 30, 60, 70, and the budget (100) for seed 6, whose policy reached
    # -200 only in the final evaluation.
    assert "| 4/6 | 65 [52, 78] (30 to 100) |" in row and "| 3 (-250), 4 (-800) |" in row
    assert "| -185.0 (-800.0) |" in row  # median and worst final deterministic return, over all six
    assert row.endswith("| 4/6, median 65 |")  # the training-return criterion: seeds 1, 3, 5, 6


def test_seed_sweep_judges_each_task_by_its_own_solved_score(tmp_path, monkeypatch, capsys):
    from seed_sweep import main, table

    def run(seed, training_steps, final, task="CartpoleSwingup"):
        return dict(task=task, label="x", variant="pql.py", budget=300, seed=seed, steps_to_solve=training_steps,
                    deterministic_steps_to_solve=None, deterministic_return=final)

    # CartpoleSwingup is solved at 700 (solve_times.py): 750 counts, 650 does not (both would at Pendulum's -200).
    rows = table([run(1, None, 750.0), run(2, 200, 650.0)])
    assert "training return reached 700 |" in rows.splitlines()[0]
    (row,) = [line for line in rows.splitlines() if line.startswith("| x |")]
    assert "| 1/2 | 300 |" in row and "| 2 (650) |" in row and row.endswith("| 1/2, median 200 |")
    # A results file with runs of three tasks at their default budgets, the Pendulum run written before
    # --task existed (no "task" key). --no-run shows the asked task's runs only, at its default budget.
    results = tmp_path / "sweep.jsonl"
    pendulum = {k: v for k, v in run(1, None, -150.0).items() if k != "task"}
    lines = [dict(run(1, None, 750.0), budget=300_000), dict(pendulum, budget=100_000), dict(run(3, None, -6.0, task="Reacher"), budget=100_000)]
    results.write_text("".join(json.dumps(dict(r, device="cpu", date="2026-11-27", machine="m")) + "\n" for r in lines))

    def shown_rows(task):
        monkeypatch.setattr(sys, "argv", ["seed_sweep.py", "--task", task, "--no-run", "--results", str(results)])
        assert main() == 0
        out = capsys.readouterr().out
        return out, [line for line in out.splitlines() if line.startswith("| x |")]

    out, rows = shown_rows("CartpoleSwingup")
    assert "CartpoleSwingup at the CPU quick-start settings, 300,000 env steps" in out and len(rows) == 1 and "| 1/1 | 300,000 |" in rows[0]
    out, rows = shown_rows("Pendulum")
    assert "Pendulum at the CPU quick-start settings, 100,000 env steps" in out and len(rows) == 1 and "| -150.0 (-150.0) |" in rows[0]
    out, rows = shown_rows("Reacher")
    assert len(rows) == 1 and "| -6.0 (-6.0) |" in rows[0]
    # Resuming skips a task's own finished runs only: Reacher's seed 3 is done, seed 1 is not (Pendulum's is).
    import seed_sweep

    asked = []
    monkeypatch.setattr(seed_sweep.grid, "run_grid", lambda jobs, *args, **kwargs: asked.extend(key for key, _, _ in jobs) or {})
    monkeypatch.setattr(sys, "argv", ["seed_sweep.py", "--task", "Reacher", "--variants", "pql.py", "--seeds", "1", "3", "--label", "x",
                                      "--results", str(results)])
    assert main() == 0 and asked == [("pql.py", 1)]
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["seed_sweep.py", "--task", "Cartpole", "--results", str(results)])
    assert main() == 2  # an unknown task is refused, before any run
    assert "--task must be one of Pendulum, Reacher, CartpoleSwingup" in capsys.readouterr().err


def write_pendulum_checkpoint(path, action_bias, critic_slope):
    """A checkpoint whose policy ignores the observation and outputs tanh(action_bias), and whose
    critic ignores it too: Q = ELU(critic_slope * action) - 1 in both heads."""
    import pql

    args = pql.Args(task="Pendulum", hidden_dims=(8,))
    actor, critic = pql.Actor(3, 1, args.hidden_dims), pql.make_critic(3, 1, args)
    with torch.no_grad():
        for layer in [actor.net[0], actor.net[-1]]:
            layer.weight.zero_()
            layer.bias.zero_()
        for tensor in critic.q_heads.parameters():  # both heads' layers, stacked (2, in, out)
            tensor.zero_()
        actor.net[-1].bias.fill_(action_bias)
        weights, biases = critic.q_heads.weights, critic.q_heads.biases
        weights[0][:, 3, 0] = critic_slope  # input 3 is the action, after the 3 observations; into hidden unit 0
        weights[-1][:, 0, 0] = 1.0
        biases[-1].fill_(-1.0)
    assert pql.save_checkpoint(str(path), actor, critic, critic, pql.ObsNormalizer(3, 5.0, "cpu"), args, 0)


def test_diagnose_pendulum_on_policies_whose_behaviour_physics_tells(tmp_path):
    import math

    from diagnose_pendulum import Args, describe, load, rollout

    # Full torque one way (2 N m, 3 * 2 = 6 in the dynamics against gravity's 15 sin theta) never
    # balances. Frictionless, it adds energy on every turn, so the starts with enough energy end
    # up spinning; the others swing around the stable equilibrium pi - asin(0.4) = 2.73 rad.
    write_pendulum_checkpoint(tmp_path / "more.pt", action_bias=8.0, critic_slope=1.0)
    args = Args(checkpoints=(str(tmp_path / "more.pt"),), starts=16, horizon=800)
    run = load(args.checkpoints[0])
    path = rollout(run, args)
    summary = describe(run, path)
    assert summary["balanced"] == 0 and summary["spinning"] >= 1 and summary["stuck"] >= 1
    assert summary["spinning"] + summary["stuck"] == 16
    assert abs(summary["stuck |angle|"] - (math.pi - math.asin(0.4))) < 0.3
    assert summary["late at limit"] == 1.0 and summary["pre-tanh > 3"] == 1.0
    # Q rises with the action: at +1 the critic asks for more and rates no negative action higher.
    assert summary["late limit, critic wants more"] == 1.0 and summary["stuck opposite better"] == 0.0
    assert summary["Q"] == pytest.approx(math.tanh(8.0) - 1.0, abs=1e-5)
    # The true value: the discounted sum of the rewards along the path, in the critic's units.
    rewards = path["rewards"][:, 0]
    expected = sum(0.99**k * rewards[k].item() for k in range(800)) * 0.01
    assert abs(path["discounted"][0, 0].item() * 0.01 - expected) < 1e-4 * abs(expected)
    assert summary["true"] == pytest.approx(path["discounted"][0].mean().item() * 0.01)

    # Q falls with the action: the critic's best action is -1, opposite to the policy's.
    write_pendulum_checkpoint(tmp_path / "less.pt", action_bias=8.0, critic_slope=-1.0)
    less = describe(load(str(tmp_path / "less.pt")), rollout(load(str(tmp_path / "less.pt")), args))
    assert less["late limit, critic wants more"] == 0.0 and less["stuck opposite better"] == 1.0

    # A weak constant torque (0.2 N m): nothing at the limit, the tanh far from flat, no balancing.
    write_pendulum_checkpoint(tmp_path / "weak.pt", action_bias=0.1, critic_slope=1.0)
    weak = describe(load(str(tmp_path / "weak.pt")), rollout(load(str(tmp_path / "weak.pt")), args))
    assert weak["late at limit"] == 0.0 and weak["pre-tanh > 3"] == 0.0 and weak["balanced"] == 0


def test_update_speed_counts_flops_and_times_each_path():
    from update_speed import mlp_flops, update_flops

    # 64-64 on Pendulum's 3 observations and 1 action: 3*64 + 64*64 + 64*1 multiply-adds per sample.
    assert mlp_flops(3, (64, 64), 1, batch=10) == 2 * 10 * (3 * 64 + 64 * 64 + 64)
    actor, q_head = mlp_flops(3, (64, 64), 1, 1024), mlp_flops(4, (64, 64), 1, 1024)
    assert update_flops((64, 64), 1024) == (actor + 8 * q_head, 3 * actor + 4 * q_head)
    out = run_script("update_speed.py", "--sizes", "quick-start", "--paths", "before", "eager", "eager+bf16", "graphs", "compile-graphs",
                     "eager+tf32", "before+bf16", "--seconds", "0.5")
    rows = table_rows(out, "quick-start")
    assert [row.split(" | ")[1] for row in rows] == ["before", "eager", "eager+bf16"], out  # before: pql.py from git history
    assert "path before+bf16 unavailable here: +bf16 is not for before" in out
    assert "GFLOP/s (bfloat16; the limit of the +bf16 paths)" in out
    assert "path graphs unavailable here: CUDA graphs need --device cuda" in out
    assert "path compile-graphs unavailable here: CUDA graphs need --device cuda" in out
    assert "path eager+tf32 unavailable here: +tf32 needs --device cuda" in out
    assert rows[0].endswith("| 1.00x |") and float(rows[0].split(" | ")[2].replace(",", "")) > 0


def test_update_speed_runs_a_path_on_pql_py_from_another_commit_or_file(tmp_path):
    """PATH@REF: the same path on pql.py as of a git commit, or from a file (a GPU machine's copy of the
    working tree has no history). The file's own code must run: here its V-step raises."""
    source = open(os.path.join(REPO, "pql.py")).read()
    assert "\ndef v_learner_step(" in source
    (tmp_path / "old_pql.py").write_text(source.replace("\ndef v_learner_step(", "\ndef v_learner_step(*_, **__):\n"
                                                         "    raise RuntimeError('the V-step of the file')\n\n\ndef unused(", 1))
    out = run_script("update_speed.py", "--sizes", "quick-start", "--paths", "eager@HEAD", "eager", "eager+bf16@HEAD",
                     f"eager@{tmp_path / 'old_pql.py'}", "eager@1cedf45", "eager@no-such-ref", "before@HEAD", "--seconds", "0.5")
    rows = table_rows(out, "quick-start")
    assert [row.split(" | ")[1] for row in rows] == ["eager@HEAD", "eager", "eager+bf16@HEAD"], out
    assert "speed-up over eager@HEAD |" in out and rows[0].endswith("| 1.00x |"), out
    assert "old_pql.py unavailable here: the V-step of the file" in out, out
    assert "path eager@1cedf45 unavailable here: pql.py at 1cedf45 has no v_learner_step, p_learner_step, RandomDraws" in out, out
    assert "path eager@no-such-ref unavailable here: no-such-ref is neither a file nor a commit of this repository" in out, out
    assert "path before@HEAD unavailable here: @ is not for before" in out, out


def test_gym_speed_times_every_path_and_the_adapters_share():
    out = run_script("gym_speed.py", "--tasks", "Hopper-v5", "--num-envs", "2", "--steps", "20", "--repeats", "1")
    (row,) = table_rows(out, "Hopper-v5 | 2 |")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    rates = [float(cell.replace(",", "")) for cell in cells[2:6]]  # single, sync, async, adapter
    assert all(rate > 0 for rate in rates), row
    assert abs(float(cells[6].rstrip("%")) - 100 * (1 - rates[3] / rates[1])) <= 1, row  # 1 - adapter / sync, from the rates shown


def write_scalars(run_dir, points):
    """A TensorBoard log with the given {tag: [(step, value), ...]}."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for tag, values in points.items():
        for step, value in values:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_gym_mujoco_table_reads_each_methods_return_at_the_milestones_and_draws_the_curves(tmp_path, capsys):
    import gym_mujoco
    import ppo
    import pql

    # One run's TensorBoard log to result line: PQL's return is its deterministic policy's (eval/),
    # seconds are env steps over the SPS logged at (or last before) each point.
    write_scalars(tmp_path / "pql_1", {
        "eval/episodic_return": [(50_000, 100.0), (96_000, 200.0), (104_000, 300.0), (192_000, 400.0), (240_000, 500.0)],
        "charts/episodic_return": [(96_000, 20.0), (200_000, 40.0), (240_000, 50.0)],
        "charts/SPS": [(48_000, 500.0), (96_000, 300.0), (200_000, 250.0), (248_000, 240.0)]})
    pql_1 = gym_mujoco.result_line(str(tmp_path / "pql_1"), "pql", "gym:Hopper-v5", 1, 1500.0, "cpu", "pql.py ...", "abc", "test machine")
    assert pql_1["returns"][:2] == [(50_000, 100.0, 100.0), (96_000, 320.0, 200.0)]
    assert (pql_1["env_steps"], pql_1["env_steps_per_s"], pql_1["training_returns"][1][2]) == (248_000, 240.0, 40.0)
    # A second seed that ends at 150k env steps counts at 100k, not at 200k; a third ends at 203k, past
    # 200k, though its last evaluation was at 190k: it counts there with that value.
    pql_2 = dict(pql_1, seed=2, returns=[(80_000, 400.0, 600.0), (150_000, 1000.0, 700.0)],
                 training_returns=[(80_000, 400.0, 60.0), (150_000, 1000.0, 70.0)], env_steps=150_000, env_steps_per_s=150.0)
    pql_3 = dict(pql_1, seed=3, returns=[(90_000, 400.0, 900.0), (190_000, 900.0, 1000.0)],
                 training_returns=[(90_000, 400.0, 90.0), (190_000, 900.0, 100.0)], env_steps=203_000, env_steps_per_s=200.0)
    write_scalars(tmp_path / "ppo_1", {"charts/episodic_return": [(99_840, 30.0), (199_680, 90.0), (3_000_000, 1500.0)],
                                       "charts/SPS": [(99_840, 2000.0), (199_680, 2000.0), (3_000_000, 2000.0)]})
    ppo_1 = gym_mujoco.result_line(str(tmp_path / "ppo_1"), "ppo", "gym:Hopper-v5", 1, 1500.0, "cpu", "benchmarks/ppo.py ...",
                                   "abc", "test machine")
    other_budget = dict(ppo_1, budget=60.0, returns=[(100, 0.1, -1e6)])
    # The final policies' returns without noise (after training): pql_2 logged none.
    pql_1, pql_3, ppo_1 = dict(pql_1, final_return=550.0), dict(pql_3, final_return=950.0), dict(ppo_1, final_return=1600.0)
    row = gym_mujoco.summarize([pql_1, pql_2, pql_3, ppo_1], ["gym:Hopper-v5"], ["pql", "ppo"])["gym:Hopper-v5", "pql"]
    assert (row["final"], row["count", "final"]) == ((550 + 950) / 2, 2)
    assert row["runs"] == 3 and row["returns", 100_000] == pytest.approx((200 + 600 + 900) / 3)  # logged at 96k, 80k, 90k
    assert row["returns", 200_000] == (400 + 1000) / 2 and (row["count", 100_000], row["count", 200_000]) == (3, 2)
    assert row["returns", "end"] == pytest.approx((500 + 700 + 1000) / 3)
    # The mean over the last tenth of each run's training seconds: pql_1's 500 (at 960 of 1,033 s), pql_2's
    # 700 (at 1,000 of 1,000 s); pql_3 logged nothing after 900 of its 1,015 s, so it is left out.
    assert row["returns", "last part"] == (500 + 700) / 2 and row["training_returns", "last part"] == (50 + 70) / 2
    assert row["training_returns", 100_000] == pytest.approx((20 + 60 + 90) / 3)

    results = tmp_path / "results.jsonl"
    stale_pql_1 = dict(pql_1, returns=[(100_000, 10.0, -5.0)])  # an earlier line for the same run: the later one counts
    # Each line keeps the versions of the packages it ran with (pql_1's line is from before they were kept).
    assert gym_mujoco.package_versions()["torch"] == torch.__version__
    pql_2 = dict(pql_2, packages={"torch": "2.13.0", "mujoco": "3.11.0"})
    ppo_1 = dict(ppo_1, packages={"torch": "2.13.0", "mujoco": "4.0.0"})
    # ... and the machine's speed just before and just after it (pql_1's and pql_2's are from before that).
    ppo_1["machine_speed"] = [{"mujoco_steps_per_s": 21_000.4, "mlp_updates_per_s": 900.0},
                              {"mujoco_steps_per_s": 10_500.0, "mlp_updates_per_s": 450.2}]
    lines = [json.dumps(r) for r in [stale_pql_1, pql_1, pql_2, ppo_1, other_budget]] + ['{"cut short']
    results.write_text("\n".join(lines) + "\n")
    gym_mujoco.main(["--no-run", "--budget", "1500", "--results", str(results), "--figures", str(tmp_path)])
    captured = capsys.readouterr()
    assert ("| gym:Hopper-v5 | pql.py | 2 | 400 (40) | 400 (40) [1 of 2 runs] | 600 (60) | 600 (60) | 550 [1 of 2 runs] | 199,000 |"
            " 195 | 1017 |") in captured.out
    assert "| gym:Hopper-v5 | PPO (rsl_rl) | 1 | 30 | 90 | 1500 | 1500 | 1600 | 3,000,000 | 2,000 | 1500 |" in captured.out  # not the 60 s run
    assert "| gym:Hopper-v5 | TD3, paper (v1) | | 659 ± 752 | 2441 ± 746 | 3391 ± 378 | | | 1,000,000 | | |" in captured.out
    assert "is not a result line; skipped" in captured.err
    assert "1 commit(s) and 2 set(s) of package versions" in captured.out
    assert "Packages: torch 2.13.0, mujoco 3.11.0; torch 2.13.0, mujoco 4.0.0 (1 run(s) logged before versions were kept)" in captured.out
    assert f"- {ppo_1['date']} gym:Hopper-v5 PPO (rsl_rl) seed 1: 21,000 and 10,500; 900 and 450" in captured.out
    assert "(2 run(s) logged before the machine's speed was kept)" in captured.out
    assert (tmp_path / "mujoco_Hopper.png").stat().st_size > 10_000
    # PQL's runs take the task's settings from pql.TASK_DEFAULTS, which their command does not repeat;
    # PPO's flags are ones ppo.py takes.
    command = gym_mujoco.command_for("pql", "gym:Hopper-v5", 1, "cpu", 1500.0)
    assert "--num-envs" not in command
    assert pql.parse_args(command[2:]).num_envs == pql.TASK_DEFAULTS["gym:Hopper-v5"]["num_envs"]
    ppo_args = ppo.parse_args(gym_mujoco.command_for("ppo", "gym:Hopper-v5", 1, "cpu", 1500.0)[2:])
    assert (ppo_args.num_envs, ppo_args.hidden_dims, ppo_args.max_time) == (64, [256, 256], 1500.0)


def test_gym_mujoco_runs_the_methods_of_a_task_and_seed_back_to_back():
    import gym_mujoco

    done = {gym_mujoco.run_key("gym:Hopper-v5", "ppo", 1, 1800.0, "cpu")}
    jobs = gym_mujoco.grid_jobs(gym_mujoco.TASKS, ["pql", "ppo"], [1, 2], 1800.0, "cpu", "logs", done)
    order = [(arguments[2], arguments[1], arguments[0]) for _, _, arguments in jobs]  # (seed, task, method)
    assert order == [(1, "gym:HalfCheetah-v5", "pql"), (1, "gym:HalfCheetah-v5", "ppo"), (1, "gym:Hopper-v5", "pql"),
                     (2, "gym:HalfCheetah-v5", "pql"), (2, "gym:HalfCheetah-v5", "ppo"), (2, "gym:Hopper-v5", "pql"),
                     (2, "gym:Hopper-v5", "ppo")]
    assert jobs[0][0] == gym_mujoco.run_key("gym:HalfCheetah-v5", "pql", 1, 1800.0, "cpu")


def test_gym_mujoco_probe_prints_the_machines_speed_as_one_json_line(monkeypatch, capsys):
    import functools

    import gym_mujoco

    # Whole episodes of HalfCheetah's physics and whole MLP updates, for 0.2 s each here (5 s in a grid).
    monkeypatch.setattr(gym_mujoco, "machine_speed", functools.partial(gym_mujoco.machine_speed, 0.2))
    gym_mujoco.main(["--probe"])
    speed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(speed) == {"mujoco_steps_per_s", "mlp_updates_per_s"}
    assert speed["mujoco_steps_per_s"] >= 1000 / 60 and speed["mlp_updates_per_s"] > 0


def test_gym_mujoco_evaluates_the_final_policy_of_runs_logged_before_and_reruns_ppo_without_one(tmp_path, capsys):
    import gym_mujoco
    import pql

    # A PQL run logged without final_return whose checkpoint is still in the log folder, one with it,
    # and a PPO run without it (ppo.py kept no policy to evaluate).
    run_dir = tmp_path / "logs" / "1500s_cpu" / "runs" / "Pendulum__pql__3__100"
    run_dir.mkdir(parents=True)
    torch.manual_seed(0)
    args = pql.Args(task="Pendulum", hidden_dims=(8,))
    actor, critic = pql.Actor(3, 1, (8,)), pql.make_critic(3, 1, args)
    assert pql.save_checkpoint(str(run_dir / "model.pt"), actor, critic, critic, pql.ObsNormalizer(3, 5.0, torch.device("cpu")), args, 64)
    line = {"task": "Pendulum", "budget": 1500.0, "device": "cpu", "returns": [], "env_steps": 64, "env_steps_per_s": 10.0}
    old_pql, evaluated_pql = dict(line, method="pql", seed=3), dict(line, method="pql", seed=4, final_return=-1.0)
    old_ppo = dict(line, method="ppo", seed=3)
    results = tmp_path / "results.jsonl"
    done = gym_mujoco.runs_done([old_pql, evaluated_pql, old_ppo], str(tmp_path / "logs"), str(results))
    assert done == {gym_mujoco.run_key("Pendulum", "pql", seed, 1500.0, "cpu") for seed in (3, 4)}
    (appended,) = [json.loads(text) for text in results.read_text().splitlines()]
    # The same episodes as pql.py's own evaluation of that checkpoint: 10 fresh envs seeded seed + 10,000.
    reference = pql.evaluate(str(run_dir / "model.pt"), gym_mujoco.FINAL_EVAL_EPISODES, torch.device("cpu"), 3 + 10_000)
    assert appended == dict(old_pql, final_return=pytest.approx(reference.mean().item(), abs=0.01))
    capsys.readouterr()


def test_mjlab_ppo_reads_rsl_rl_progress_and_stops_the_run_at_the_budget(tmp_path):
    """mjlab_ppo.py follows mjlab's PPO by what rsl_rl prints each iteration (the block below is
    copied from a real run): return and env steps per iteration, time summed from the iteration
    times, and an interrupt once the budget is trained. The stand-in prints 50 iterations unless
    interrupted, the first without a return (rsl_rl prints none before an episode ends)."""
    import mjlab_ppo
    block = ("\x1b[1m   Learning iteration {i}/10000000   \x1b[0m \n\n"
             "                            Total steps: {steps} \n"
             "                       Steps per second: 429 \n"
             "                        Mean value loss: 0.0078\n"
             "{reward}"
             "                    Mean episode length: 60.75\n"
             "           Episode_Reward/smooth_reward: 0.0149\n"
             "--------------------------------------------------------------------------------\n"
             "                         Iteration time: 1.25s\n"
             "                           Time elapsed: 0:00:04\n")
    stand_in = (f"import time\nblock = {block!r}\n"
                "for i in range(50):\n"
                "    reward = '' if i == 0 else f'                            Mean reward: {0.5 * i:.2f}\\n'\n"
                "    print(block.format(i=i, steps=512 * (i + 1), reward=reward), flush=True)\n"
                "    time.sleep(0.01)\n")
    folder = str(tmp_path / "ppo")
    points, sps, steps = mjlab_ppo.ppo_curve(folder, [sys.executable, "-c", stand_in], budget=4.0, env=dict(os.environ))
    assert points == [(2.5, 1024, 0.5), (3.75, 1536, 1.0), (5.0, 2048, 1.5)]  # stopped at the first time >= 4 s
    assert (steps, sps) == (2048, 2048 / 5.0)
    assert mjlab_ppo.return_at(points, 4.0) == 1.0 and mjlab_ppo.return_at(points, 2.0) is None
    # finished: a second call reads the recorded points and does not run the command again
    assert mjlab_ppo.ppo_curve(folder, ["false"], budget=4.0, env=dict(os.environ)) == (points, sps, steps)


@pytest.mark.parametrize("flags, named", [(["--budget", "0"], "--budget"), (["--device", "tpu"], "--device"),
                                          (["--task", "Mjlab-No-Such-Task"], "--task")])
def test_mjlab_ppo_refuses_bad_flags_before_any_run(flags, named, tmp_path):
    pytest.importorskip("mjlab", reason="mjlab is not installed (pip install -r requirements-mjlab.txt)")
    result = subprocess.run([sys.executable, os.path.join(BENCH, "mjlab_ppo.py"), *flags, "--logdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2 and named in result.stderr, result.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # nothing ran


def test_threaded_roles_times_each_role_of_one_run(tmp_path):
    """One toy pql_threaded.py run: the table has a row per role, the counts are the run's, and on
    the CPU the V-learner (eight updates per iteration) is the role the actor waits for."""
    flags = "--device cpu --num-envs 16 --hidden-dims 32 32 --batch-size 64 --buffer-size 16000 --warmup-iterations 4 --total-timesteps 1600 --eval-envs 0"
    result = subprocess.run([sys.executable, os.path.join(BENCH, "threaded_roles.py"), f"--flags={flags}"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = re.search(r"(\d+) iterations, (\d+) V-updates, (\d+) P-updates", result.stdout)
    iterations, v_updates, p_updates = map(int, counts.groups())
    assert iterations == 100 and 8 * (iterations - 4 - 2) <= v_updates <= 8 * (iterations - 4) and v_updates // 2 - 2 <= p_updates <= v_updates // 2
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ") and "%" in line}
    assert sorted(rows) == ["actor", "p-learner", "v-learner"]

    def share(role, column):  # the percentage in a column (0: loop s, 1: waiting for its rule, ...)
        cell = rows[role].split("|")[2 + column]
        return float(re.search(r"\((\d+)%\)", cell).group(1))
    # Compared with each other, not with fixed shares: a loaded machine that descheduled the actor would
    # count as the V-learner's waiting for data (its updates are about ten times the actor's work here).
    assert share("actor", 1) > share("v-learner", 1)
    assert (tmp_path / "runs").is_dir()  # the run itself wrote its logs where it ran


def test_threaded_roles_refuses_a_bad_flag_before_any_run(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(BENCH, "threaded_roles.py"), "--switch-interval", "0"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "--switch-interval" in result.stderr and not (tmp_path / "runs").exists()


THREAD_STACKS = """\
thread (7): actor;<module> (pql_threaded.py:1);train (pql_threaded.py:2);torch::autograd::THPVariable_to_type (libtorch_python.so);pthread_cond_timedwait (libc.so.6);0x7f12 (libc.so.6) 4
thread (7): actor;<module> (pql_threaded.py:1);copy_weights (pql_threaded.py:7);Module.state_dict (torch/nn/modules/module.py:2264);pthread_cond_wait (libc.so.6);0x7f88 (libc.so.6) 3
thread (7): actor;<module> (pql_threaded.py:1);Coordinator.wait_until (pql_threaded.py:9);Condition.wait (threading.py:331);lock_PyThread_acquire_lock (libpython3.11.so.1.0);pthread_cond_timedwait (libc.so.6);0x7f88 (libc.so.6) 3
thread (7): actor;<module> (pql_threaded.py:1);Coordinator.wait_until (pql_threaded.py:9);Condition.wait (threading.py:331);lock_PyThread_acquire_lock (libpython3.11.so.1.0);PyThread_acquire_lock_timed (libpython3.11.so.1.0);0x7f13 (libc.so.6);0x7f14 (libc.so.6) 20
thread (7): actor;<module> (pql_threaded.py:1);train (pql_threaded.py:3);cudaStreamSynchronize (libcudart.so.12);0x1 (libcuda.so.1);0x2 (libc.so.6) 5
thread (7): actor;<module> (pql_threaded.py:1);train (pql_threaded.py:3);cudaLaunchKernel (libcudart.so.12);0x3 (libcuda.so.1);pthread_mutex_lock (libc.so.6) 4
thread (7): actor;<module> (pql_threaded.py:1);train (pql_threaded.py:3);cudaLaunchKernel (libcudart.so.12);0x3 (libcuda.so.1) 6
thread (7): actor;<module> (pql_threaded.py:1);update (pql_threaded.py:5);torch::autograd::Engine::thread_main (libtorch_cpu.so);at::(anonymous namespace)::GlobalCallbackManager::getSnapshot (libtorch_cpu.so);pthread_mutex_lock (libc.so.6) 2
thread (7): actor;<module> (pql_threaded.py:1);explore (pql_threaded.py:4);at::native::addmm_out (libtorch_cpu.so) 25
thread (7): actor;<module> (pql_threaded.py:1);explore (pql_threaded.py:4);c10::alloc_cpu (libc10.so);posix_memalign (libc.so.6);0x9 (libc.so.6) 3
thread (7): actor;<module> (pql_threaded.py:1);explore (pql_threaded.py:4);Linear.forward (torch/nn/modules/linear.py:134) 15
thread (7): actor;<module> (pql_threaded.py:1);train (pql_threaded.py:2);GOMP_parallel (libgomp.so.1) 10
thread (8): tqdm_monitor;Thread.run (threading.py:982);gc_collect_main (libpython3.11.so.1.0) 3
"""


def test_thread_stacks_sorts_each_sample_by_its_innermost_frames(tmp_path):
    """Hand-labelled py-spy stacks (raw format; the GIL's, the Python lock's and torch's mutex as
    py-spy wrote them on the CPU), in known numbers: the table gives each category its share of the
    thread's samples, the script's lines theirs, and the unsorted samples' innermost frame shows."""
    stacks = tmp_path / "stacks.txt"
    stacks.write_text(THREAD_STACKS)
    out = run_script("thread_stacks.py", "--read", stacks)
    header = next(line for line in out.splitlines() if line.startswith("| thread"))
    columns = [cell.strip() for cell in header.split("|")[3:-1]]
    shares = {row.split("|")[1].strip(): dict(zip(columns, [cell.strip() for cell in row.split("|")[3:-1]]))
              for row in out.splitlines() if row.startswith("| ") and "%" in row}
    assert shares["actor"] == {"the GIL": "10.0%", "a Python lock or condition": "20.0%", "waiting for the GPU": "5.0%",
                               "CUDA driver, on a lock": "4.0%", "CUDA": "6.0%", "torch's C++, waiting": "2.0%",
                               "torch's C++": "28.0%", "Python": "15.0%", "other": "10.0%"}
    assert shares["tqdm_monitor"]["Python"] == "100.0%"
    assert "| actor | 100 |" in out and "| tqdm_monitor | 3 |" in out
    actor_lines = out.split("actor: where in pql_threaded.py")[1].split("\n\n")[0]
    assert "43.0%  explore (pql_threaded.py:4)" in actor_lines and "23.0%  Coordinator.wait_until (pql_threaded.py:9)" in actor_lines
    assert "15.0%  train (pql_threaded.py:3)" in actor_lines and "14.0%  train (pql_threaded.py:2)" in actor_lines
    assert "other:  10.0%  in GOMP_parallel (libgomp.so.1)" in actor_lines


def test_thread_stacks_samples_a_toy_run_once_training_started_and_stops_it(tmp_path):
    """py-spy on a toy pql_threaded.py run sized for minutes: the samples begin at training (none in
    the main thread's set-up), each thread's are in its own role's code, and the run is stopped and saved."""
    if shutil.which("py-spy") is None and shutil.which("py-spy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("py-spy is not installed (pip install py-spy)")
    flags = ("--device cpu --num-envs 16 --hidden-dims 32 32 --batch-size 64 --buffer-size 16000 --total-timesteps 10000000"
             " --eval-envs 0 --max-time 100")  # --max-time: a run left behind by a failed test ends by itself
    result = subprocess.run([sys.executable, os.path.join(BENCH, "thread_stacks.py"), f"--flags={flags}", "--seconds", "1", "--top", "100"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sections = {part.split(":")[0].strip(): part for part in result.stdout.split("\n\n")}
    assert {"MainThread", "v-learner", "p-learner"} <= set(sections), result.stdout[-3000:]
    # Each thread's samples are in its own role's code: in its update or its loop, or waiting for its rule
    # (on a loaded machine a thread can wait the whole sampled second, so waiting counts), never in another
    # role's code; the main thread's begin at the actor's loop, none in the set-up.
    own = {"v-learner": r"update_critic|v_learner_step|v_learner", "p-learner": r"update_actor|p_learner_step|p_learner",
           "MainThread": r"train|explore"}
    for thread, own_code in own.items():
        assert re.search(rf"({own_code}|Coordinator.wait_until) \(pql_threaded.py", sections[thread]), sections[thread]
        others = "|".join(code for name, code in own.items() if name != thread)
        assert not re.search(rf"\b({others}) \(pql_threaded.py", sections[thread]), sections[thread]
    assert not re.search(r"set_up_and_run|capture_cuda_graph|<module>|make_env", sections["MainThread"])
    assert len(list((tmp_path / "runs").glob("*/model.pt"))) == 1  # stopped by SIGTERM, it saved its checkpoint


def test_thread_stacks_refuses_bad_flags_and_names_py_spys_install(tmp_path, monkeypatch):
    result = subprocess.run([sys.executable, os.path.join(BENCH, "thread_stacks.py"), "--seconds", "0.5"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "--seconds" in result.stderr and not (tmp_path / "runs").exists()
    import thread_stacks
    monkeypatch.setattr(thread_stacks.shutil, "which", lambda *args, **kwargs: None)
    assert "pip install py-spy" in thread_stacks.record(thread_stacks.Args(out=str(tmp_path / "stacks.txt")))
