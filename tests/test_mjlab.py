"""The mjlab adapter (envs.MjlabEnv, `--task mjlab:<TaskId>`) against mjlab driven directly.

Needs mjlab (`pip install -r requirements-mjlab.txt`, Python >= 3.10); without it these tests are
skipped, except the one for the error that names the install command and the one with stand-ins
for mjlab and torch.cuda (the context of every call into mjlab). The first run compiles
Warp's kernels (about a minute on 2 cores; WARP_CACHE_PATH says where they are kept).

Mjlab-Cartpole-Balance has 1000-step episodes and no failure condition, so the rollout test
shortens the episode to 4 s (80 steps) and adds a failure: |pole angle| > 0.25 rad. Env 2 runs
a PD balancer and reaches the time limit; the others fail, several times. The adapter's
trajectory is compared with two direct mjlab runs from the same seed and the same actions
(replayed open loop): one with auto_reset=False and explicit reset(env_ids=...) (it gives the
true final obs), and one with mjlab's default auto-reset (an independent path for next_obs,
rewards and flags). Everything must agree bit for bit.
"""

import importlib.util
import os
import random
import sys

import numpy as np
import pytest
import torch

import envs

HAVE_MJLAB = sys.version_info >= (3, 10) and importlib.util.find_spec("mjlab") is not None


def needs_mjlab(test):
    """Skipped without mjlab; with it, waits for the Warp kernels that conftest.py compiles in the background."""
    skip = pytest.mark.skipif(not HAVE_MJLAB, reason="mjlab is not installed: pip install -r requirements-mjlab.txt (Python 3.10 to 3.13)")
    return pytest.mark.usefixtures("mjlab_kernels")(skip(test))


if HAVE_MJLAB:
    import mjlab.tasks  # noqa: F401  (registers the tasks)
    from mjlab.envs import ManagerBasedRlEnv
    from mjlab.managers.scene_entity_config import SceneEntityCfg
    from mjlab.managers.termination_manager import TerminationTermCfg
    from mjlab.tasks.registry import load_env_cfg

MjlabEnv = envs.MjlabEnv

TASK = "Mjlab-Cartpole-Balance"
N = 4
T = 120
SEED = 0
EPISODE_S = 4.0  # 80 steps of 0.05 s
LIMIT = 0.25  # rad


def pole_fell(env, asset_cfg, limit: float = LIMIT) -> torch.Tensor:
    angle = env.scene[asset_cfg.name].data.joint_pos[:, asset_cfg.joint_ids].squeeze(-1)
    return angle.abs() > limit


def short_episodes_with_failure(cfg):
    cfg.episode_length_s = EPISODE_S
    cfg.terminations["pole_fell"] = TerminationTermCfg(
        func=pole_fell, params={"asset_cfg": SceneEntityCfg("cartpole", joint_names=("hinge_1",))}
    )


def policy(obs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """obs = [x, cos th, sin th, x_dot, th_dot]. Envs 0, 1: uniform noise, with env 1's
    scaled to +-1.5 so the adapter's clipping is exercised; env 2: a PD balancer (survives
    to the time limit); env 3: the same gains with the wrong sign (fails fast)."""
    a = torch.rand(N, 1, generator=gen) * 2 - 1
    a[1] *= 1.5
    pd = 20.0 * obs[:, 2] + 3.0 * obs[:, 4] + obs[:, 0] + obs[:, 3]
    a[2, 0] = pd[2]
    a[3, 0] = -pd[3]
    return a


def direct_env(auto_reset: bool):
    cfg = load_env_cfg(TASK)
    cfg.scene.num_envs = N
    cfg.seed = SEED
    cfg.auto_reset = auto_reset
    short_episodes_with_failure(cfg)
    return ManagerBasedRlEnv(cfg, device="cpu")


@pytest.fixture(scope="module")
def rollouts():
    # 1. The adapter, closed loop.
    env = MjlabEnv(TASK, N, device="cpu", seed=SEED, cfg_hook=short_episodes_with_failure)
    gen = torch.Generator().manual_seed(1)
    ad = {"reset_obs": env.reset(), "actions": [], "next_obs": [], "reward": [], "terminated": [],
          "truncated": [], "final_obs": [], "episode_return": [], "episode_length": [], "valid": []}
    obs = ad["reset_obs"]
    for _ in range(T):
        a = policy(obs, gen)
        obs, reward, terminated, truncated, info = env.step(a)
        ad["actions"].append(a)
        for k, v in [("next_obs", obs), ("reward", reward), ("terminated", terminated),
                     ("truncated", truncated)] + [(k, info[k]) for k in
                                                  ("final_obs", "episode_return", "episode_length", "valid")]:
            ad[k].append(v.clone())
    ad_env = env
    ad = {k: (torch.stack(v) if isinstance(v, list) else v) for k, v in ad.items()}
    # mjlab clips nothing: the raw action it saw must be ours clipped to [-1, 1].
    last_raw = env.env.action_manager.action.clone()
    actions = ad["actions"].clamp(-1.0, 1.0)

    # 2. mjlab directly, auto_reset=False, explicit resets: true final obs.
    env = direct_env(auto_reset=False)
    ra = {"reset_obs": env.reset()[0]["actor"].clone(), "final_obs": [], "next_obs": [],
          "reward": [], "terminated": [], "truncated": []}
    for t in range(T):
        obs_dict, reward, terminated, truncated, _ = env.step(actions[t])
        step_obs = obs_dict["actor"].clone()
        ra["final_obs"].append(step_obs)
        ra["reward"].append(reward.clone())
        ra["terminated"].append(terminated.clone())
        ra["truncated"].append(truncated.clone())
        next_obs = step_obs.clone()
        ids = [i for i in range(N) if terminated[i] or truncated[i]]
        if ids:  # one reset call for all of them, as mjlab's auto-reset does (same RNG draws)
            reset_obs = env.reset(env_ids=torch.tensor(ids))[0]["actor"]
            next_obs[ids] = reset_obs[ids]
        ra["next_obs"].append(next_obs)
    env.close()
    ra = {k: (torch.stack(v) if isinstance(v, list) else v) for k, v in ra.items()}

    # 3. mjlab directly with its default auto-reset.
    env = direct_env(auto_reset=True)
    rb = {"reset_obs": env.reset()[0]["actor"].clone(), "next_obs": [], "reward": [],
          "terminated": [], "truncated": []}
    for t in range(T):
        obs_dict, reward, terminated, truncated, _ = env.step(actions[t])
        rb["next_obs"].append(obs_dict["actor"].clone())
        rb["reward"].append(reward.clone())
        rb["terminated"].append(terminated.clone())
        rb["truncated"].append(truncated.clone())
    env.close()
    rb = {k: (torch.stack(v) if isinstance(v, list) else v) for k, v in rb.items()}
    return {"adapter": ad, "env": ad_env, "manual": ra, "auto": rb, "last_raw": last_raw,
            "max_len": ad_env.max_episode_length}


@needs_mjlab
def test_interface_attributes():
    torch.manual_seed(11)
    before, hash_seed = torch.get_rng_state(), os.environ.get("PYTHONHASHSEED")
    env = envs.make_env("mjlab:" + TASK, 3, device="cpu", seed=5)
    assert torch.equal(torch.get_rng_state(), before), "building the env must not reseed the caller's RNG"
    assert os.environ.get("PYTHONHASHSEED") == hash_seed, "mjlab sets PYTHONHASHSEED when it seeds: restored"
    assert isinstance(env, MjlabEnv) and env.obs_group == "actor"
    assert env.task == "mjlab:" + TASK
    assert (env.num_envs, env.obs_dim, env.act_dim) == (3, 5, 1)
    assert env.max_episode_length == 1000  # 50 s at 0.01 s x decimation 5
    assert env.device == torch.device("cpu") and env.check_finite_actions is True
    obs = env.reset()
    assert obs.shape == (3, 5) and obs.dtype == torch.float32
    next_obs, reward, terminated, truncated, info = env.step(torch.zeros(3, 1))
    assert next_obs.shape == (3, 5) and next_obs.dtype == torch.float32
    assert reward.shape == (3,) and reward.dtype == torch.float32
    assert terminated.dtype == torch.bool and truncated.dtype == torch.bool
    assert set(info) == {"final_obs", "episode_return", "episode_length", "valid"}
    assert info["episode_return"].dtype == torch.float32 and info["episode_length"].dtype == torch.float32
    # rewards are mjlab's: per-step reward times dt (0.05); the smooth reward is <= 1
    assert bool((reward > 0).all()) and bool((reward <= 0.05).all())
    with pytest.raises(ValueError):
        env.step(torch.zeros(3, 2))
    with pytest.raises(ValueError):
        env.step(torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError):
        env.step(torch.full((3, 1), float("nan")))
    with pytest.raises(ValueError, match="Mjlab-Cartpole-Balance"):  # names the tasks there are
        MjlabEnv("Mjlab-No-Such-Task", 2)


@needs_mjlab
def test_episode_ends_happen(rollouts):
    ad, max_len = rollouts["adapter"], rollouts["max_len"]
    assert max_len == 80
    assert int(ad["terminated"].sum()) >= 5, "expected several failures"
    assert int(ad["truncated"].sum()) >= 1, "expected a time-limit end (env 2)"
    assert bool(ad["truncated"][:, 2].any())


@needs_mjlab
def test_reset_obs_match(rollouts):
    ad, ra, rb = rollouts["adapter"], rollouts["manual"], rollouts["auto"]
    assert torch.equal(ad["reset_obs"], ra["reset_obs"])
    assert torch.equal(ad["reset_obs"], rb["reset_obs"])


@needs_mjlab
def test_steps_match_mjlab(rollouts):
    ad, ra, rb = rollouts["adapter"], rollouts["manual"], rollouts["auto"]
    for ref in (ra, rb):
        assert torch.equal(ad["next_obs"], ref["next_obs"])
        assert torch.equal(ad["reward"], ref["reward"])
        assert torch.equal(ad["terminated"], ref["terminated"])
        assert torch.equal(ad["truncated"], ref["truncated"])
    assert torch.equal(ad["final_obs"], ra["final_obs"])
    assert bool(ad["valid"].all())


@needs_mjlab
def test_final_obs_semantics(rollouts):
    ad = rollouts["adapter"]
    done = ad["terminated"] | ad["truncated"]
    same = (ad["final_obs"] == ad["next_obs"]).all(-1)
    assert bool(same[~done].all()), "final_obs must equal next_obs where no episode ended"
    assert not bool(same[done].any()), "a finished env's next_obs must be a reset obs"
    # A failed episode's final obs shows the pole past the limit (obs[2] = sin th).
    term = ad["terminated"]
    assert bool((ad["final_obs"][term][:, 2].abs() > np.sin(LIMIT)).all())
    # Reset obs are near upright (start noise +-0.034 rad).
    assert bool((ad["next_obs"][done][:, 2].abs() < 0.04).all())


@needs_mjlab
def test_episode_stats(rollouts):
    ad, rb, max_len = rollouts["adapter"], rollouts["auto"], rollouts["max_len"]
    done = (rb["terminated"] | rb["truncated"]).numpy()
    reward = rb["reward"].numpy()
    exp_ret = np.zeros((T, N), dtype=np.float32)
    exp_len = np.zeros((T, N), dtype=np.float32)
    for i in range(N):
        ret, length = np.float32(0.0), 0
        for t in range(T):
            ret = np.float32(ret + reward[t, i])
            length += 1
            if done[t, i]:
                exp_ret[t, i], exp_len[t, i] = ret, length
                ret, length = np.float32(0.0), 0
    np.testing.assert_array_equal(ad["episode_length"].numpy(), exp_len)
    np.testing.assert_allclose(ad["episode_return"].numpy(), exp_ret, rtol=1e-6, atol=0)
    # A time-limit end comes after exactly max_episode_length steps.
    trunc = ad["truncated"] & ~ad["terminated"]
    assert bool((ad["episode_length"][trunc] == max_len).all())


@needs_mjlab
def test_actions_clipped(rollouts):
    # the last action mjlab received is the adapter's clipped action
    assert torch.equal(rollouts["last_raw"], rollouts["adapter"]["actions"][-1].clamp(-1, 1))
    assert bool((rollouts["adapter"]["actions"].abs() > 1).any()), "the test should exercise clipping"


@needs_mjlab
def test_rng_isolation_and_reset_reproducible(rollouts):
    env = rollouts["env"]
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    cpu_state, np_state, py_state = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = env.reset()
    for _ in range(3):
        env.step(torch.zeros(N, 1))
    assert torch.equal(torch.get_rng_state(), cpu_state), "the adapter must not touch the caller's torch RNG"
    assert np.array_equal(np.random.get_state()[1], np_state), "the adapter must not touch numpy's RNG"
    assert random.getstate() == py_state, "the adapter must not touch Python's RNG"
    assert torch.equal(first, rollouts["adapter"]["reset_obs"]), "reset() restarts mjlab's stream: same start states"


@needs_mjlab
def test_finite_horizon_time_limit_is_a_termination():
    def hook(cfg):
        cfg.episode_length_s = 0.2  # 4 steps
        cfg.is_finite_horizon = True

    env = MjlabEnv(TASK, 2, device="cpu", seed=1, cfg_hook=hook)
    assert env.max_episode_length == 4
    env.reset()
    for t in range(4):
        _, _, terminated, truncated, info = env.step(torch.zeros(2, 1))
        assert not bool(truncated.any())
        assert bool(terminated.all()) == (t == 3)
    assert info["episode_length"].tolist() == [4.0, 4.0]


class RecordingContext:
    """Stands in for torch.cuda.device, and for an env's PrivateTorchRng: records what is entered."""

    def __init__(self, entered, what):
        self.entered, self.what = entered, what

    def __enter__(self):
        self.entered.append(self.what)

    def __exit__(self, *exc):
        self.entered.remove(self.what)


def test_calls_into_mjlab_run_with_the_envs_gpu_current_and_its_own_random_stream(monkeypatch):
    """With the env on cuda:1 while cuda:0 is current (pql.py --device cuda:1), mjlab must be
    called with cuda:1 current (its ExternalStreams take the current GPU) and inside the env's
    private random stream (MjlabEnv.inside_mjlab); reset and step call it only there. Without a GPU
    or mjlab: the contexts are recorders, the inner mjlab env a stand-in that looks at them."""
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: RecordingContext(entered, device))
    env = MjlabEnv.__new__(MjlabEnv)  # no mjlab here: the attributes reset and step use, by hand
    env.device, env.rng = torch.device("cuda", 1), RecordingContext(entered, "rng")
    with env.inside_mjlab():
        assert entered == [torch.device("cuda", 1), "rng"]
    assert entered == []

    seen_by_mjlab = []

    class StandIn:
        def reset(self, env_ids=None):
            seen_by_mjlab.append(list(entered))
            return {"actor": torch.zeros(2, 3)}, {}

        def step(self, actions):
            seen_by_mjlab.append(list(entered))
            return {"actor": torch.ones(2, 3)}, torch.ones(2), torch.tensor([True, False]), torch.zeros(2, dtype=torch.bool), {}

    env.device, env.env, env.obs_group, env.num_envs, env.act_dim = torch.device("cpu"), StandIn(), "actor", 2, 1
    env.action_scale, env.check_finite_actions, env.finite_horizon, env.rng_after_build = 1.0, True, False, None
    env.running_return, env.running_length = torch.zeros(2), torch.zeros(2)
    monkeypatch.setattr(MjlabEnv, "inside_mjlab", lambda self: RecordingContext(entered, "inside_mjlab"))
    env.reset()
    env.step(torch.zeros(2, 1))  # env 0 ends: mjlab's step, then its reset of env 0
    assert seen_by_mjlab == [["inside_mjlab"]] * 3 and entered == []


def test_missing_mjlab_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mjlab", None)  # makes `import mjlab...` raise ImportError
    monkeypatch.setitem(sys.modules, "mjlab.tasks", None)
    with pytest.raises(ImportError, match="pip install -r requirements-mjlab.txt"):
        envs.make_env("mjlab:Mjlab-Cartpole-Balance", 4)
