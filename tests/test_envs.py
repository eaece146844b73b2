"""Tests of envs.py: the interface contract, the built-in tasks' physics, Gymnasium
parity, the Isaac Gym adapter against a stand-in, bad inputs, and the benchmark script.
Run: pytest -q tests/test_envs.py (CPU, well under a minute)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import envs  # noqa: E402
import isaacgym_standin  # noqa: E402  (tests/ is on sys.path under pytest)

BUILTINS = envs.list_tasks()


def random_actions(n, act_dim, generator, low=-1.0, high=1.0, dtype=torch.float32):
    return torch.rand(n, act_dim, generator=generator, dtype=dtype) * (high - low) + low


# ---------------------------------------------------------------------------------------
# Interface contract of the built-in tasks
# ---------------------------------------------------------------------------------------


def test_list_tasks_and_table():
    assert BUILTINS == ["Pendulum", "CartpoleSwingup", "Reacher"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "envs.py")], capture_output=True, text=True, check=True).stdout
    for name in BUILTINS:
        cls = envs.TASKS[name]
        row = [line.split() for line in out.splitlines() if line.startswith(name + " ")]
        assert row == [[name, str(cls.obs_dim), str(cls.act_dim), str(cls.max_episode_length)]]
    assert "gym:<id>" in out and "isaacgym:<Task>" in out


@pytest.mark.parametrize("task", BUILTINS)
def test_shapes_dtypes_device(task):
    n = 7
    env = envs.make_env(task, n, seed=1)
    assert (env.num_envs, env.task, env.device) == (n, task, torch.device("cpu"))
    assert env.obs_dim >= 3 and env.act_dim >= 1 and env.max_episode_length > 0
    obs = env.reset()
    assert obs.shape == (n, env.obs_dim) and obs.dtype == torch.float32 and obs.is_contiguous()
    g = torch.Generator().manual_seed(0)
    next_obs, reward, terminated, truncated, info = env.step(random_actions(n, env.act_dim, g))
    assert next_obs.shape == (n, env.obs_dim) and next_obs.dtype == torch.float32 and next_obs.is_contiguous()
    assert reward.shape == (n,) and reward.dtype == torch.float32 and torch.isfinite(reward).all()
    assert terminated.shape == truncated.shape == (n,)
    assert terminated.dtype == truncated.dtype == torch.bool
    assert set(info) == {"final_obs", "episode_return", "episode_length", "valid"}
    assert info["final_obs"].shape == (n, env.obs_dim) and info["final_obs"].dtype == torch.float32
    for key in ("episode_return", "episode_length"):
        assert info[key].shape == (n,) and info[key].dtype == torch.float32
    assert info["valid"].dtype == torch.bool and info["valid"].all()
    assert not next_obs.equal(obs)  # the state moved


@pytest.mark.parametrize("task", BUILTINS)
def test_truncation_auto_reset_and_episode_stats(task):
    """Two episodes and a bit: truncation exactly at max_episode_length, final_obs is the
    stepped state's obs and next_obs the fresh state's, episode stats match our own sums."""
    n = 5
    env = envs.make_env(task, n, seed=2)
    T = env.max_episode_length
    g = torch.Generator().manual_seed(1)
    obs = env.reset()
    returns = torch.zeros(n, dtype=torch.float64)
    ends = 0
    for t in range(1, 2 * T + 3):
        a = random_actions(n, env.act_dim, g)
        state_before = env.state.clone()
        next_obs, reward, terminated, truncated, info = env.step(a)
        returns += reward.double()
        assert not terminated.any()  # no built-in task terminates
        # Where the step landed before any reset (independent of the auto-reset code path).
        stepped, stepped_obs, _ = env.dynamics(state_before, a.t())
        assert torch.equal(stepped_obs, env.observe(stepped))
        assert torch.allclose(info["final_obs"], env.observe(stepped).t(), atol=1e-6)
        if t % T == 0:
            ends += 1
            assert truncated.all()
            assert not torch.allclose(info["final_obs"], next_obs)
            assert torch.equal(next_obs, env.observe(env.state).t())  # the fresh state's obs
            assert env.t == 0 and env.episode == ends
            assert torch.allclose(info["episode_return"].double(), returns, rtol=1e-5, atol=1e-3)
            assert torch.equal(info["episode_length"], torch.full((n,), float(T)))
            returns.zero_()
        else:
            assert not truncated.any()
            assert torch.equal(info["final_obs"], next_obs)
            assert torch.equal(info["episode_return"], torch.zeros(n))
            assert torch.equal(info["episode_length"], torch.zeros(n))
        obs = next_obs
    assert ends == 2


@pytest.mark.parametrize("task", BUILTINS)
def test_seeding(task):
    def rollout(seed, n=3, steps=None):
        env = envs.make_env(task, n, seed=seed)
        steps = steps or env.max_episode_length + 5  # crosses an auto-reset
        g = torch.Generator().manual_seed(123)
        out = [env.reset()]
        for _ in range(steps):
            o, r, _, _, info = env.step(random_actions(n, env.act_dim, g))
            out += [o, r, info["final_obs"]]
        return out

    a, b, c = rollout(0), rollout(0), rollout(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])
    # reset() re-seeds: a second reset starts over.
    env = envs.make_env(task, 3, seed=0)
    first = env.reset()
    env.step(torch.zeros(3, env.act_dim))
    assert torch.equal(env.reset(), first)
    # An env's random numbers depend on (seed, its index), not on how many envs there are.
    assert torch.equal(envs.make_env(task, 8, seed=5).reset()[:3], envs.make_env(task, 3, seed=5).reset())


def test_random_initial_states_are_uniform():
    n = 20000
    env = envs.make_env("Pendulum", n, seed=0)
    u0 = env.uniforms().double()
    env.episode += 1
    u1 = env.uniforms().double()
    for u in (u0, u1):
        assert (u > 0).all() and (u < 1).all()
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
        assert abs(np.corrcoef(u[0], u[1])[0, 1]) < 0.03  # draws of one env
        assert abs(np.corrcoef(u[0, :-1], u[0, 1:])[0, 1]) < 0.03  # neighbouring envs
    assert abs(np.corrcoef(u0[0], u1[0])[0, 1]) < 0.03  # consecutive episodes
    # Pendulum-v1 start: theta ~ U[-pi, pi], theta_dot ~ U[-1, 1].
    th, thdot = envs.make_env("Pendulum", n, seed=3).state
    assert th.abs().max() <= math.pi and thdot.abs().max() <= 1
    assert th.min() < -3.1 and th.max() > 3.1 and thdot.min() < -0.99 and thdot.max() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    for task in BUILTINS:
        cpu, gpu = envs.make_env(task, 64, "cpu", seed=4), envs.make_env(task, 64, "cuda", seed=4)
        assert torch.equal(cpu.reset(), gpu.reset().cpu())  # initial states bit for bit
        g = torch.Generator().manual_seed(0)
        for _ in range(20):
            a = random_actions(64, cpu.act_dim, g)
            o1, r1, _, _, _ = cpu.step(a)
            o2, r2, _, _, _ = gpu.step(a.cuda())
            assert torch.allclose(o1, o2.cpu(), atol=1e-4) and torch.allclose(r1, r2.cpu(), atol=1e-4)


# ---------------------------------------------------------------------------------------
# Physics of the built-in tasks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,resync_every_step,steps", [(torch.float64, False, 1100), (torch.float32, True, 400)])
def test_pendulum_matches_gymnasium(dtype, resync_every_step, steps):
    """Same states and actions into ours and Gymnasium's Pendulum-v1: obs, reward and the
    200-step truncation must agree. In float64 both run free within each episode (they are
    only synced at episode starts); float32 is resynced each step (rounding drifts)."""
    import gymnasium as gym

    n = 4
    ours = envs.make_env("Pendulum", n, seed=3, dtype=dtype)
    theirs = [gym.make("Pendulum-v1") for _ in range(n)]

    def sync(i):
        theirs[i].unwrapped.state = ours.state[:, i].double().numpy().copy()

    ours.reset()
    for i, e in enumerate(theirs):
        e.reset(seed=i)
        sync(i)
    g = torch.Generator().manual_seed(0)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    truncations = 0
    for _ in range(steps):
        if resync_every_step:
            for i in range(n):
                sync(i)
        a = random_actions(n, 1, g, -1.3, 1.3, dtype)  # some beyond [-1, 1]: both clip
        _, reward, terminated, truncated, info = ours.step(a)
        for i, e in enumerate(theirs):
            obs_i, rew_i, term_i, trunc_i, _ = e.step(np.array([2.0 * float(a[i, 0])]))
            assert not term_i and not bool(terminated[i])
            assert trunc_i == bool(truncated[i])
            assert np.allclose(info["final_obs"][i].double().numpy(), obs_i, atol=1e-6 if tol < 1e-6 else 1e-4)
            assert abs(float(reward[i]) - rew_i) <= tol * max(1.0, abs(rew_i))
            if trunc_i:
                truncations += 1
                e.reset()
                sync(i)
    assert truncations == n * (steps // 200)


def test_cartpole_conserves_energy_and_momentum_without_force():
    """Frictionless cart-pole, zero force: energy and horizontal momentum are conserved by
    the true dynamics, so the integrator's errors in them must be small and shrink in
    proportion to the time step (first order). Wrong equations would not converge."""
    mc, mp, l, g = 1.0, 0.1, 0.5, 9.81

    def energy_momentum(s):
        x, th, xd, thd = s
        # Pole centre of mass at (x + l sin th, l cos th); inertia about it mp (2l)^2 / 12.
        vx, vy = xd + l * th.cos() * thd, -l * th.sin() * thd
        kinetic = 0.5 * mc * xd**2 + 0.5 * mp * (vx**2 + vy**2) + 0.5 * (mp * (2 * l) ** 2 / 12) * thd**2
        return kinetic + mp * g * l * th.cos(), mc * xd + mp * vx

    def max_errors(dt):
        env = envs.make_env("CartpoleSwingup", 16, seed=0, dtype=torch.float64)
        assert (env.cart_mass, env.pole_mass, env.half_length, env.gravity) == (mc, mp, l, g)
        env.dt = dt
        env.state[1] = torch.linspace(0.2, 3.0, 16, dtype=torch.float64)  # various angles from upright
        e0, p0 = energy_momentum(env.state)
        de = dp = 0.0
        for _ in range(round(0.9 / dt)):  # 0.9 s of motion
            env.step(torch.zeros(16, 1, dtype=torch.float64))
            e, p = energy_momentum(env.state)
            de, dp = max(de, float((e - e0).abs().max())), max(dp, float((p - p0).abs().max()))
        assert env.state[0].abs().max() < env.rail  # never hit the end stop
        return de, dp

    (de1, dp1), (de2, dp2) = max_errors(0.01), max_errors(0.001)
    swing = 2 * mp * g * l  # energy between hanging and upright
    assert de1 < 0.03 * swing and dp1 < 0.03
    assert 7 < de1 / de2 < 13 and 7 < dp1 / dp2 < 13


def test_cartpole_reward_and_end_stop():
    env = envs.make_env("CartpoleSwingup", 3, seed=0)
    # Upright at rest at the centre, zero force: reward 1. Hanging: about 0.
    state = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.pi, 0.0], [0, 0, 0], [0, 0, 0]])
    _, _, reward = env.dynamics(state, torch.zeros(1, 3))
    assert reward[0] == pytest.approx(1.0, abs=1e-3) and reward[1] == pytest.approx(0.0, abs=1e-3)

    # Random states and actions: dm_control's formula, written out from its tolerance().
    def tolerance(x, margin, sigmoid="gaussian", value_at_margin=0.1):
        d = np.abs(x) / margin
        if sigmoid == "gaussian":
            return np.exp(-0.5 * (d * np.sqrt(-2 * np.log(value_at_margin))) ** 2)
        return np.where(d < 1, 1 - d**2, 0.0)  # quadratic, value 0 at the margin

    g = torch.Generator().manual_seed(0)
    state = (torch.rand(4, 100, generator=g) * 2 - 1) * torch.tensor([[1.5], [3.0], [2.0], [8.0]])
    u = random_actions(1, 100, g)
    nxt, obs, reward = env.dynamics(state, u)
    assert torch.allclose(obs, env.observe(nxt))
    x, th, _, thd = nxt.double().numpy()
    un = u[0].double().numpy()
    expected = ((np.cos(th) + 1) / 2 * (1 + tolerance(x, 2)) / 2
                * (4 + tolerance(un, 1, "quadratic", 0)) / 5 * (1 + tolerance(thd, 5)) / 2)
    assert np.allclose(reward.numpy(), expected, atol=1e-6)

    # Full force for 3 s: the cart stops at the end of the rail and stays there.
    env.reset()
    for _ in range(300):
        _, reward, *_ = env.step(torch.ones(3, 1))
        assert (env.state[0] <= env.rail).all() and (reward >= 0).all() and (reward <= 1).all()
    assert torch.allclose(env.state[0], torch.full((3,), env.rail))
    assert torch.equal(env.state[2], torch.zeros(3))


def test_reacher_physics():
    env = envs.make_env("Reacher", 64, seed=0, dtype=torch.float64)
    obs = env.reset()
    # Targets lie in the disc of radius 0.2; the obs holds tip - target by forward kinematics.
    target = obs[:, 4:6]
    assert target.norm(dim=1).max() <= 0.2 and target.norm(dim=1).min() < 0.05
    q1, q2 = env.state[0], env.state[1]
    tip = torch.stack([0.1 * q1.cos() + 0.11 * (q1 + q2).cos(), 0.1 * q1.sin() + 0.11 * (q1 + q2).sin()], 1)
    assert torch.allclose(obs[:, 8:10], tip - target)
    assert torch.allclose(obs[:, :4], torch.stack([q1.cos(), q2.cos(), q1.sin(), q2.sin()], 1))

    # Without damping or torque the kinetic energy 1/2 q_dot' M(q) q_dot is conserved.
    env.damping = 0.0
    env.state[2] = torch.linspace(-3, 3, 64, dtype=torch.float64)
    env.state[3] = torch.linspace(2, -2, 64, dtype=torch.float64)

    def kinetic(s):
        c2 = s[1].cos()
        m11, m12, m22 = env.k1 + 2 * env.k2 * c2, env.k3 + env.k2 * c2, env.k3 + env.armature
        return 0.5 * (m11 * s[2] ** 2 + 2 * m12 * s[2] * s[3] + m22 * s[3] ** 2)

    k0 = kinetic(env.state)
    for _ in range(40):
        env.step(torch.zeros(64, 2, dtype=torch.float64))
        assert ((kinetic(env.state) - k0).abs() / k0).max() < 0.03
        assert env.state[1].abs().max() <= env.elbow_limit

    # Reward: -distance - 0.1 |a|^2, on the state after the step.
    env = envs.make_env("Reacher", 2, seed=0)
    env.reset()
    next_obs, reward, _, _, _ = env.step(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.allclose(reward, -next_obs[:, 8:10].norm(dim=1) - torch.tensor([0.2, 0.0]), atol=1e-6)


def test_scripted_controllers_beat_random():
    """The reference controllers of benchmarks/score_envs.py solve each task: a check
    that the physics is controllable as documented, on 16 episodes."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import score_envs

    floor = {"Pendulum": -300, "CartpoleSwingup": 800, "Reacher": -6}  # docs: -158, 858, -4.5
    for task in BUILTINS:
        good = score_envs.evaluate(task, "scripted", 16, seed=1).mean()
        rand = score_envs.evaluate(task, "random", 16, seed=1).mean()
        assert good > floor[task] and good > rand + 0.5 * abs(rand), (task, good, rand)


# ---------------------------------------------------------------------------------------
# Gymnasium adapter
# ---------------------------------------------------------------------------------------


def test_gymnasium_adapter_matches_gymnasium():
    """gym:InvertedPendulum-v5 (actions +-3) against Gymnasium driven directly with the
    same seed and the rescaled, clipped actions."""
    import gymnasium as gym

    n, seed = 3, 7
    ours = envs.make_env("gym:InvertedPendulum-v5", n, seed=seed)
    assert (ours.obs_dim, ours.act_dim, ours.max_episode_length) == (4, 1, 1000)
    direct = gym.make_vec("InvertedPendulum-v5", num_envs=n, vectorization_mode="sync",
                          vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    obs = ours.reset()
    d_obs, _ = direct.reset(seed=seed)
    assert np.allclose(obs.numpy(), d_obs, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    returns, lengths, ends = np.zeros(n), np.zeros(n), 0
    for _ in range(300):
        a = random_actions(n, 1, g, -1.5, 1.5)
        next_obs, reward, terminated, truncated, info = ours.step(a)
        d_obs, d_rew, d_term, d_trunc, d_info = direct.step(3.0 * np.clip(a.double().numpy(), -1, 1))
        returns += d_rew
        lengths += 1
        assert np.allclose(next_obs.numpy(), d_obs, atol=1e-5)
        assert np.allclose(reward.numpy(), d_rew)
        assert terminated.tolist() == d_term.tolist() and truncated.tolist() == d_trunc.tolist()
        done = d_term | d_trunc
        for i in range(n):
            if done[i]:
                assert np.allclose(info["final_obs"][i].numpy(), d_info["final_obs"][i], atol=1e-5)
                assert not torch.allclose(info["final_obs"][i], next_obs[i])
                assert info["episode_return"][i] == pytest.approx(returns[i])
                assert info["episode_length"][i] == lengths[i]
                returns[i] = lengths[i] = 0
                ends += 1
            else:
                assert torch.equal(info["final_obs"][i], next_obs[i])
                assert info["episode_return"][i] == 0 and info["episode_length"][i] == 0
        assert info["valid"].all()
    assert ends >= 10  # random actions topple the pendulum often


def test_gymnasium_truncation_and_action_scaling():
    env = envs.make_env("gym:HalfCheetah-v5", 2, seed=0)
    assert (env.obs_dim, env.act_dim, env.max_episode_length) == (17, 6, 1000)
    env.reset()
    g = torch.Generator().manual_seed(0)
    for t in range(1, 1001):
        next_obs, _, terminated, truncated, info = env.step(random_actions(2, 6, g))
        assert not terminated.any()
        assert truncated.all() == (t == 1000) and truncated.any() == (t == 1000)
    assert torch.equal(info["episode_length"], torch.full((2,), 1000.0))
    assert not torch.allclose(info["final_obs"], next_obs)

    # Humanoid's actions are +-0.4: our 0.5 must arrive as 0.2, our 2.0 (clipped) as 0.4.
    import gymnasium as gym

    ours = envs.make_env("gym:Humanoid-v5", 1, seed=0)
    assert np.allclose(ours.action_high, 0.4) and np.allclose(ours.action_low, -0.4)
    for ours_a, theirs_a in ((0.5, 0.2), (2.0, 0.4)):
        direct = gym.make_vec("Humanoid-v5", num_envs=1, vectorization_mode="sync")
        direct.reset(seed=0)
        ours.reset()
        o, *_ = ours.step(torch.full((1, 17), ours_a))
        d, *_ = direct.step(np.full((1, 17), theirs_a))
        assert np.allclose(o.numpy(), d, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Isaac Gym adapter, against the stand-in
# ---------------------------------------------------------------------------------------


def test_isaacgym_adapter_semantics(monkeypatch):
    # clip_actions=inf: the task does not clip, so the clipping seen is the adapter's.
    made = isaacgym_standin.install(monkeypatch, max_episode_length=10, clip_actions=float("inf"))
    n = 4
    env = envs.make_env("isaacgym:Point", n, seed=3)
    sim = made["task"]
    assert made["make_kwargs"]["task"] == "Point" and made["make_kwargs"]["headless"] is True
    assert made["make_kwargs"]["seed"] == 3 and made["make_kwargs"]["num_envs"] == n
    assert (env.obs_dim, env.act_dim, env.max_episode_length) == (2, 1, 10)

    # reset() really resets (VecTask.reset alone returns the all-zero cached buffer).
    obs = env.reset()
    assert (obs[:, 0] != 0).all() and (obs[:, 0].abs() <= 0.5).all()
    assert torch.equal(obs[:, 0], sim.x)

    # env 0 pushes right (fails), env 1 stays put (times out), env 2 pushes left (fails),
    # env 3 asks for 3.0, which must be clipped to 1.0 (fails).
    actions = torch.tensor([[1.0], [0.0], [-1.0], [3.0]])
    prev_done = torch.zeros(n, dtype=torch.bool)
    prev_final = None
    returns, lengths = torch.zeros(n), torch.zeros(n)
    kinds = {"terminated": set(), "truncated": set()}
    kept = []
    for t in range(40):
        next_obs, reward, terminated, truncated, info = env.step(actions)
        kept.append([x.clone() for x in (next_obs, reward, terminated, truncated, info["final_obs"])] +
                    [(next_obs, reward, terminated, truncated, info["final_obs"])])
        applied = sim.log[-1]
        assert torch.equal(applied["action"], actions[:, 0].clamp(-1, 1))
        valid = info["valid"]
        # The step after an episode end is the lazy reset: invalid, reward 0, no done,
        # next_obs the reset state; the action it applied hit the terminal state.
        assert torch.equal(valid, ~prev_done)
        for i in range(n):
            if prev_done[i]:
                assert applied["x_before"][i] == prev_final[i, 0]
                assert reward[i] == 0 and not terminated[i] and not truncated[i]
                assert abs(next_obs[i, 0]) <= 0.5 and next_obs[i, 0] == sim.x[i]
                assert sim.progress_buf[i] == 0
            else:
                assert reward[i] == pytest.approx(1 - abs(float(next_obs[i, 0])))
        returns += reward
        lengths += valid.float()
        done = terminated | truncated
        assert not (terminated & truncated).any()
        # Obs clipping: the second entry is 10 x clipped to +-5.
        assert torch.allclose(next_obs[:, 1], (10 * next_obs[:, 0]).clamp(-5, 5))
        # final_obs is the true terminal obs (Isaac Gym returns it with done = 1).
        assert torch.equal(info["final_obs"], next_obs)
        for i in range(n):
            if done[i]:
                kinds["terminated" if terminated[i] else "truncated"].add(i)
                if terminated[i]:
                    assert abs(next_obs[i, 0]) > 1.0
                else:
                    assert lengths[i] == env.max_episode_length - 1 and abs(next_obs[i, 0]) <= 1.0
                assert info["episode_return"][i] == pytest.approx(float(returns[i]))
                assert info["episode_length"][i] == lengths[i]
                returns[i] = lengths[i] = 0
            else:
                assert info["episode_return"][i] == 0 and info["episode_length"][i] == 0
        prev_done, prev_final = done, info["final_obs"]
    assert kinds == {"terminated": {0, 2, 3}, "truncated": {1}}
    # Isaac Gym reuses its buffers in place; what the adapter returned must not change.
    for *copies, originals in kept:
        assert all(torch.equal(c, o) for c, o in zip(copies, originals))

    # A second reset() resets every env again, mid-episode or not.
    before = sim.x.clone()
    obs = env.reset()
    assert torch.equal(sim.progress_buf, torch.zeros(n, dtype=torch.long))
    assert torch.equal(obs[:, 0], sim.x) and not torch.equal(sim.x, before)
    _, _, _, _, info = env.step(torch.zeros(n, 1))
    assert info["valid"].all()


def test_isaacgym_adapter_reset_state_already_done(monkeypatch):
    """If Isaac Gym flags an env done on its reset step (a reset state that is terminal,
    or stale obs after a reset), the next step is a reset step again: also invalid.
    Invariant: valid[t] == not reset_buf[t-1], and ends are reported on valid steps only."""
    made = isaacgym_standin.install(monkeypatch, max_episode_length=6, reset_range=1.5)
    n = 64
    env = envs.make_env("isaacgym:Point", n, seed=0)
    sim = made["task"]
    env.reset()
    raw_done = sim.reset_buf != 0
    assert raw_done.any()  # some reset states are terminal right away
    lengths = torch.zeros(n)
    twice = 0
    for _ in range(30):
        _, reward, terminated, truncated, info = env.step(torch.zeros(n, 1))
        valid = info["valid"]
        assert torch.equal(valid, ~raw_done)
        twice += int((~valid & (sim.reset_buf != 0)).sum())
        raw_done = sim.reset_buf != 0
        done = terminated | truncated
        assert torch.equal(done, raw_done & valid)
        assert (reward[~valid] == 0).all()
        lengths += valid.float()
        assert torch.equal(info["episode_length"], torch.where(done, lengths, torch.zeros(n)))
        lengths[done] = 0
    assert twice > 0


def test_isaacgym_missing_or_imported_late(monkeypatch):
    monkeypatch.delitem(sys.modules, "isaacgym", raising=False)
    with pytest.raises(ImportError) as err:
        envs.make_env("isaacgym:Ant", 4)
    msg = str(err.value)
    for step in ("Isaac Gym Preview 4", "pip install -e isaacgym/python", "IsaacGymEnvs", "numpy<1.24", "Python 3.8"):
        assert step in msg
    # Installed but imported after torch: say so, not "install it".
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(RuntimeError, match="import isaacgym"):
        envs.make_env("isaacgym:Ant", 4)


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------


def test_unknown_task_and_bad_num_envs():
    with pytest.raises(ValueError) as err:
        envs.make_env("Pendulumm", 4)
    for part in BUILTINS + ["gym:<id>", "isaacgym:<Task>"]:
        assert part in str(err.value)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="num_envs"):
            envs.make_env("Pendulum", bad)
    with pytest.raises(ValueError, match="dtype"):
        envs.make_env("gym:InvertedPendulum-v5", 1, dtype=torch.float64)


@pytest.mark.parametrize("task", ["Reacher", "gym:InvertedPendulum-v5"])
def test_bad_actions(task, monkeypatch):
    env = envs.make_env(task, 3)
    env.reset()
    good = torch.zeros(3, env.act_dim)
    with pytest.raises(ValueError, match=r"shape"):
        env.step(torch.zeros(3, env.act_dim + 1))
    with pytest.raises(ValueError, match=r"shape"):
        env.step(torch.zeros(env.act_dim))
    with pytest.raises(ValueError, match="floating"):
        env.step(good.long())
    with pytest.raises(ValueError, match="torch.Tensor"):
        env.step(good.numpy())
    nan = good.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="check_finite_actions"):
        env.step(nan)
    inf = good.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        env.step(inf)
    env.step(good)  # still usable after the errors
    # The switch: no check and no sync. Built-ins pass NaN through to the physics.
    if task == "Reacher":
        env.check_finite_actions = False
        obs, *_ = env.step(nan)
        assert torch.isnan(obs[1]).any() and not torch.isnan(obs[0]).any()


# ---------------------------------------------------------------------------------------
# Benchmark script
# ---------------------------------------------------------------------------------------


def test_benchmark_script_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_envs.py"), "--num-envs", "64", "--repeats", "2"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    for task in BUILTINS:
        rows = [line.split() for line in out.splitlines() if line.startswith(task + " ")]
        assert len(rows) == 1 and rows[0][1] == "64", out
        step_us, steps_per_s, forward_us = float(rows[0][2]), float(rows[0][3]), float(rows[0][4])
        assert step_us > 0 and forward_us > 0
        assert steps_per_s == pytest.approx(64 / (step_us * 1e-6), rel=0.01)
