"""Tests of pql.py: the parts against independent references, then the script as users run it."""
import copy
import ctypes
import glob
import importlib
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

import pql

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Replay buffer: n-step returns against a brute-force computation
# ---------------------------------------------------------------------------------------------
def fill_random_buffer(num_envs, capacity, steps, obs_dim=2, act_dim=1, seed=0):
    """Write `steps` random env steps with random terminations and truncations; also return the
    per-env history as plain Python lists, the reference for the brute-force n-step sums."""
    rng = np.random.default_rng(seed)
    buffer = pql.ReplayBuffer(num_envs, capacity, obs_dim, act_dim, torch.device("cpu"))
    history = [[] for _ in range(num_envs)]
    for step in range(steps):
        obs = rng.normal(size=(num_envs, obs_dim)).astype(np.float32)
        actions = rng.uniform(-1, 1, size=(num_envs, act_dim)).astype(np.float32)
        rewards = rng.normal(size=num_envs).astype(np.float32)
        next_obs = rng.normal(size=(num_envs, obs_dim)).astype(np.float32)
        end = rng.uniform(size=num_envs)
        terminated, truncated = end < 0.15, (end >= 0.15) & (end < 0.3)
        valid = rng.uniform(size=num_envs) > 0.1
        buffer.add(*(torch.from_numpy(x) for x in (obs, actions, rewards, next_obs, terminated, truncated, valid)))
        for env in range(num_envs):
            history[env].append(dict(obs=obs[env], action=actions[env], reward=rewards[env], next_obs=next_obs[env],
                                     terminated=terminated[env], ended=terminated[env] | truncated[env], valid=valid[env]))
    return buffer, history


def brute_force_nstep(rows, start, nstep, gamma):
    """Sum rewards from `start` until n rows, the last written row, or an episode end."""
    total, k = 0.0, 0
    for k in range(1, nstep + 1):
        row = rows[start + k - 1]
        total += gamma ** (k - 1) * row["reward"]
        if row["ended"] or start + k == len(rows):
            break
    last = rows[start + k - 1]
    discount = 0.0 if last["terminated"] else gamma ** k
    return total, last["next_obs"], discount


@pytest.mark.parametrize("nstep", [1, 3, 5])
@pytest.mark.parametrize("steps", [4, 7, 23])  # not full, exactly full, wrapped around (capacity 7)
def test_nstep_returns_match_brute_force(nstep, steps):
    num_envs, capacity, gamma = 3, 7, 0.9
    buffer, history = fill_random_buffer(num_envs, capacity, steps)
    assert buffer.size == min(steps, capacity)
    env_index = torch.arange(num_envs).repeat_interleave(buffer.size)
    age = torch.arange(buffer.size).repeat(num_envs)
    start = (buffer.pos - 1 - age) % capacity  # the row `age` rows before the newest
    obs, actions, n_step_reward, bootstrap_obs, discount, valid = buffer.gather(env_index, start, age, nstep, gamma)
    for i in range(len(env_index)):
        rows = history[env_index[i]][-buffer.size:]  # the rows still in the ring
        start = len(rows) - 1 - age[i].item()
        expected_reward, expected_next_obs, expected_discount = brute_force_nstep(rows, start, nstep, gamma)
        assert obs[i].numpy() == pytest.approx(rows[start]["obs"])
        assert actions[i].numpy() == pytest.approx(rows[start]["action"])
        assert valid[i].item() == float(rows[start]["valid"])
        assert n_step_reward[i].item() == pytest.approx(expected_reward, abs=1e-5)
        assert bootstrap_obs[i].numpy() == pytest.approx(expected_next_obs)
        assert discount[i].item() == pytest.approx(expected_discount, abs=1e-6)


def test_hopper_falls_end_nstep_windows_without_bootstrapping():
    """Terminations as learning sees them: gym:Hopper-v5 (Gymnasium's MuJoCo task, which ends an
    episode when the hopper falls) under random actions, its transitions written into PQL's buffer
    as the scripts write them. Every window that reaches a fall stops there with discount 0; a
    fall's final observation is the fallen state (Hopper's health rule: torso angle beyond +-0.2
    rad or height below 0.7) and the next row starts a new, upright episode."""
    num_envs, steps, gamma = 4, 120, 0.99
    env = pql.envs.make_env("gym:Hopper-v5", num_envs, seed=0)
    buffer = pql.ReplayBuffer(num_envs, steps, env.obs_dim, env.act_dim, torch.device("cpu"))
    history = [[] for _ in range(num_envs)]
    obs, generator = env.reset(), torch.Generator().manual_seed(0)
    for _ in range(steps):
        actions = torch.rand(num_envs, env.act_dim, generator=generator) * 2 - 1
        next_obs, rewards, terminated, truncated, info = env.step(actions)
        buffer.add(obs, actions, rewards, info["final_obs"], terminated, truncated, info["valid"])
        for e in range(num_envs):
            history[e].append(dict(obs=obs[e].numpy(), reward=rewards[e].item(), next_obs=info["final_obs"][e].numpy(),
                                   terminated=bool(terminated[e]), ended=bool(terminated[e] | truncated[e])))
        obs = next_obs
    falls = [(e, t) for e in range(num_envs) for t in range(steps) if history[e][t]["terminated"]]
    assert len(falls) >= 10  # random actions topple the hopper within tens of steps
    for e, t in falls:
        height, angle = history[e][t]["next_obs"][:2]
        assert height < 0.7 or abs(angle) > 0.2  # the final observation is the fallen state ...
        if t + 1 < steps:
            height, angle = history[e][t + 1]["obs"][:2]
            assert height > 0.7 and abs(angle) < 0.2  # ... and the next row a fresh, upright start
    env_index = torch.arange(num_envs).repeat_interleave(steps)
    age = torch.arange(steps).repeat(num_envs)
    start = (buffer.pos - 1 - age) % steps
    _, _, n_step_reward, bootstrap_obs, discount, _ = buffer.gather(env_index, start, age, 3, gamma)
    windows_into_a_fall = 0
    for i in range(len(env_index)):
        rows, first = history[env_index[i]], steps - 1 - age[i].item()
        expected_reward, expected_next_obs, expected_discount = brute_force_nstep(rows, first, 3, gamma)
        assert n_step_reward[i].item() == pytest.approx(expected_reward, rel=1e-5, abs=1e-5)
        assert bootstrap_obs[i].numpy() == pytest.approx(expected_next_obs, abs=1e-6)
        assert discount[i].item() == pytest.approx(expected_discount, abs=1e-7)
        windows_into_a_fall += expected_discount == 0.0
    assert windows_into_a_fall >= 2 * len(falls)  # most falls are reached by the windows of 3 rows


def test_sampling_only_returns_written_rows():
    num_envs, capacity = 4, 50
    buffer = pql.ReplayBuffer(num_envs, capacity, 1, 1, torch.device("cpu"))
    written = set()
    for step in range(5):
        ids = torch.arange(num_envs, dtype=torch.float32) * 1000 + step + 1  # 0 marks an unwritten row
        written.update(ids.tolist())
        false = torch.zeros(num_envs, dtype=torch.bool)
        buffer.add(ids[:, None], ids[:, None], ids, ids[:, None], false, false, ~false)
    draws = pql.RandomDraws(10_000, num_envs, 0, torch.device("cpu"))
    draws.draw()
    obs = buffer.sample(draws, nstep=3, gamma=0.99, window=buffer.window)[0]
    sampled = set(obs.squeeze(1).tolist())
    assert sampled <= written
    assert sampled == written  # and every written row can be drawn
    draws.draw()
    assert set(buffer.sample_obs(draws, buffer.window).squeeze(1).tolist()) == written  # the P-learner's observations alike


def test_rows_are_drawn_uniformly_from_the_window_on_the_device():
    """Ages come from a device-held window (a large random integer modulo the number of rows):
    uniform over the allowed rows, none outside, after the ring has wrapped."""
    buffer = pql.ReplayBuffer(3, 40, 1, 1, torch.device("cpu"), overwrite_guard=3)
    false = torch.zeros(3, dtype=torch.bool)
    for step in range(53):  # wraps: pos 13, full
        buffer.add(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3), torch.zeros(3, 1), false, false, ~false)
    assert buffer.window.tolist() == [13, 37]  # pos, and 40 rows less the 3 guarded ones
    draws = pql.RandomDraws(370_000, 3, 0, torch.device("cpu"))
    draws.draw()
    env_index, start, age = buffer.sample_rows(draws, buffer.window)
    assert torch.equal(start, (13 - 1 - age) % 40)
    counts = torch.bincount(age, minlength=37).double()
    assert len(counts) == 37  # no age beyond the window
    expected = 370_000 / 37
    assert ((counts - expected).abs() < 5 * expected**0.5).all()  # within 5 sigma of uniform, every age
    assert ((torch.bincount(env_index).double() - 370_000 / 3).abs() < 5 * (370_000 / 3) ** 0.5).all()


def test_timeouts_bootstrap_and_terminations_do_not():
    """An episode ended by a time limit bootstraps from the true final obs; a terminated one does not."""
    buffer = pql.ReplayBuffer(2, 10, 1, 1, torch.device("cpu"))
    no = torch.tensor([False, False])
    ones = torch.ones(2, 1)
    # env 0 is truncated at the 2nd step, env 1 terminated at it; the final obs are 7.0 and 8.0
    buffer.add(ones * 1, ones, torch.ones(2), ones * 2, no, no, ~no)
    buffer.add(ones * 2, ones, torch.ones(2), torch.tensor([[7.0], [8.0]]), torch.tensor([False, True]), torch.tensor([True, False]), ~no)
    buffer.add(ones * 0, ones, torch.ones(2), ones * 5, no, no, ~no)  # the first step of the next episodes
    first_rows, ages = torch.tensor([0, 0]), torch.tensor([2, 2])  # the first of three rows written
    _, _, n_step_reward, bootstrap_obs, discount, _ = buffer.gather(torch.tensor([0, 1]), first_rows, ages, 3, 0.5)
    assert n_step_reward.tolist() == [1.5, 1.5]  # the window stops at the episode end
    assert bootstrap_obs.squeeze(1).tolist() == [7.0, 8.0]
    assert discount.tolist() == [0.25, 0.0]  # gamma^2 for the truncation, no bootstrap for the termination


# ---------------------------------------------------------------------------------------------
# Normalizer, exploration noise, critic and actor updates
# ---------------------------------------------------------------------------------------------
def test_obs_normalizer_matches_numpy():
    rng = np.random.default_rng(0)
    normalizer = pql.ObsNormalizer(3, clip=5.0, device=torch.device("cpu"))
    batches = [rng.normal(loc=[1.0, -2.0, 10.0], scale=[0.5, 3.0, 0.01], size=(n, 3)) for n in (1, 17, 256, 3)]
    for batch in batches:
        normalizer.update(torch.tensor(batch, dtype=torch.float32))
    everything = np.concatenate(batches).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(normalizer.mean.numpy(), everything.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(normalizer.var.numpy(), everything.var(0), rtol=1e-4)
    x = torch.tensor(batches[1], dtype=torch.float32)
    expected = np.clip((batches[1] - everything.mean(0)) / np.sqrt(everything.var(0) + 1e-8), -5, 5)
    np.testing.assert_allclose(normalizer.normalize(x).numpy(), expected, rtol=1e-3, atol=1e-3)
    assert normalizer.normalize(torch.tensor([[1e6, -1e6, 10.0]])).abs().max().item() == 5.0  # clamped


def test_exploration_noise_is_spread_over_envs():
    stds = pql.exploration_stds(5, 0.05, 0.3, torch.device("cpu"))
    np.testing.assert_allclose(stds.numpy(), [0.05, 0.1125, 0.175, 0.2375, 0.3], rtol=1e-6)
    torch.manual_seed(0)
    zero_policy = lambda obs: torch.zeros(obs.shape[0], 4)  # noqa: E731
    normalizer = pql.ObsNormalizer(2, clip=5.0, device=torch.device("cpu"))
    samples = torch.stack([pql.explore(zero_policy, normalizer, torch.zeros(5, 2), stds) for _ in range(2000)])
    measured = samples.std(dim=(0, 2))  # per env, over time and action dimensions
    np.testing.assert_allclose(measured.numpy(), stds.numpy(), rtol=0.05)


def make_args(**overrides):
    return pql.Args(**{**dict(hidden_dims=(16, 16), batch_size=32), **overrides})


@pytest.mark.parametrize("grad_scale", [0.01, 10.0])
def test_clip_grad_norm_scales_gradients_as_torchs_clip_grad_norm(grad_scale):
    """Against nn.utils.clip_grad_norm_: gradients far above max_norm scaled down to it, gradients
    below it left as they are."""
    torch.manual_seed(0)
    critic, reference = pql.Critic(3, 2, (8, 8)), pql.Critic(3, 2, (8, 8))
    for param, reference_param in zip(critic.parameters(), reference.parameters()):
        param.grad = torch.randn_like(param) * grad_scale
        reference_param.grad = param.grad.clone()
    before = [param.grad.clone() for param in critic.parameters()]
    pql.clip_grad_norm(critic, 1.0)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    for param, reference_param in zip(critic.parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, reference_param.grad)
    total_norm = torch.linalg.vector_norm(torch.cat([param.grad.flatten() for param in critic.parameters()]))
    if grad_scale == 10.0:
        assert total_norm.item() == pytest.approx(1.0, rel=1e-4)
    else:
        assert total_norm.item() < 1.0
        for param, old in zip(critic.parameters(), before):
            torch.testing.assert_close(param.grad, old)


def test_critic_update_target_and_polyak_averaging():
    torch.manual_seed(0)
    args = make_args(tau=0.1, target_policy_noise=0.2, target_noise_clip=0.3)
    critic, policy = pql.Critic(3, 2, args.hidden_dims), pql.Actor(3, 2, args.hidden_dims)
    critic_target = pql.Critic(3, 2, args.hidden_dims).requires_grad_(False)  # different weights on purpose
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)  # lr 0: the critic stays put, only the target moves
    normalizer = pql.ObsNormalizer(3, clip=5.0, device=torch.device("cpu"))
    batch = (torch.randn(32, 3), torch.rand(32, 2) * 2 - 1, torch.randn(32), torch.randn(32, 3), torch.rand(32),
             (torch.rand(32) > 0.2).float())
    old_target = copy.deepcopy(critic_target)
    target_noise = torch.randn(32, 2)  # N(0, 1): scaled by 0.2, then clipped to +-0.3
    loss, _, _ = pql.update_critic(critic, critic_target, optimizer, policy, normalizer, batch, target_noise, args)
    # The loss against a target computed here, independently:
    # r + discount * min(Q1', Q2')(s', a'), a' = pi(s') + clip(0.2 * noise, +-0.3), within [-1, 1].
    obs, actions, reward, bootstrap_obs, discount, valid = batch
    with torch.no_grad():
        next_actions = (policy(bootstrap_obs) + (0.2 * target_noise).clamp(-0.3, 0.3)).clamp(-1.0, 1.0)
        tq1, tq2 = old_target(bootstrap_obs, next_actions)
        target = reward + discount * torch.min(tq1, tq2)
        q1, q2 = critic(obs, actions)
        errors = (q1 - target) ** 2 + (q2 - target) ** 2
    assert loss.item() == pytest.approx((errors[valid > 0]).mean().item(), rel=1e-5)
    for p, t, old in zip(critic.parameters(), critic_target.parameters(), old_target.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * p)


def test_actor_update_follows_the_critic_and_leaves_it_alone():
    torch.manual_seed(0)
    args = make_args(actor_lr=1e-2)
    actor = pql.Actor(3, 1, args.hidden_dims)
    # A frozen "critic" whose Q is highest at action +1: the policy must move its actions up.
    # Its two heads (stacked, as Critic returns them) differ by 1: the loss follows the lower.
    class PreferPositive(torch.nn.Module):
        def forward(self, obs, actions):
            return torch.stack([actions.squeeze(1) + 1.0, actions.squeeze(1)])
    optimizer = torch.optim.AdamW(actor.parameters(), lr=args.actor_lr)
    normalizer = pql.ObsNormalizer(3, clip=5.0, device=torch.device("cpu"))
    obs = torch.randn(64, 3)
    before = actor(obs).mean().item()
    first_loss = pql.update_actor(actor, optimizer, PreferPositive(), normalizer, obs, args).item()
    assert first_loss == pytest.approx(-before, abs=1e-6)  # minus the lower head's mean Q
    for _ in range(19):
        pql.update_actor(actor, optimizer, PreferPositive(), normalizer, obs, args)
    assert actor(obs).mean().item() > before + 0.3


@pytest.mark.parametrize("bound", [3.0, float("inf")])
def test_pre_tanh_penalty_pulls_a_saturated_policy_back_inside_its_bound(bound):
    args = make_args(actor_lr=0.05, pre_tanh_bound=bound)
    actor = pql.Actor(3, 1, args.hidden_dims)
    with torch.no_grad():  # a policy at full torque everywhere: tanh(8), where the tanh is flat
        for param in actor.parameters():
            param.zero_()
        actor.net[-1].bias.fill_(8.0)

    class Indifferent(torch.nn.Module):  # a critic with no opinion on the action: only the penalty acts
        def forward(self, obs, actions):
            return 0.0 * actions.squeeze(1).expand(2, -1)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=args.actor_lr)
    normalizer = pql.ObsNormalizer(3, clip=5.0, device=torch.device("cpu"))
    obs = torch.randn(64, 3)
    first_loss = pql.update_actor(actor, optimizer, Indifferent(), normalizer, obs, args).item()
    for _ in range(150):
        pql.update_actor(actor, optimizer, Indifferent(), normalizer, obs, args)
    pre_tanh = actor.net(normalizer.normalize(obs)).detach()
    if bound == 3.0:
        assert first_loss == pytest.approx((8.0 - 3.0) ** 2)  # the squared excess, averaged over the batch
        # Pulled back inside the bound; Adam's momentum carries it a little past, but inside the
        # bound the penalty is zero, so nothing pushes it on toward 0.
        assert pre_tanh.max() < 3.05 and pre_tanh.min() > 2.0
    else:
        assert first_loss == 0.0 and pre_tanh.min() > 7.0  # no penalty: only AdamW's weight decay moves it


# ---------------------------------------------------------------------------------------------
# The fast path against the code before it
# ---------------------------------------------------------------------------------------------
def load_pql_before():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from update_speed import load_pql_before

    return load_pql_before()


def test_the_code_before_loads_from_a_file_where_git_history_is_missing(tmp_path, monkeypatch):
    """benchmarks/update_speed.py on a GPU machine gets a copy of the working tree without .git:
    PQL_BEFORE_SOURCE names a file holding the old pql.py instead of reading it from git."""
    source = subprocess.run(["git", "show", "1cedf45:pql.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    (tmp_path / "old_pql.py").write_text(source + "\nLOADED_FROM_THE_FILE = True\n")
    monkeypatch.setenv("PQL_BEFORE_SOURCE", str(tmp_path / "old_pql.py"))
    before = load_pql_before()
    assert before.LOADED_FROM_THE_FILE and hasattr(before, "update_critic") and not hasattr(before, "v_learner_step")


@pytest.mark.parametrize("distributional", [False, True])
def test_fast_updates_match_the_code_before_them(distributional):
    """Both Q heads in one batched matmul per layer, fused AdamW and one multi-tensor target update
    against pql.py before them (from git history: two Q networks, AdamW's loop over tensors, a loop
    of lerps): from the same weights, on the same batches and target noise, 16 V-updates and 8
    P-updates give the same losses and weights, to float tolerance."""
    before = load_pql_before()
    buffer, _ = fill_random_buffer(num_envs=8, capacity=40, steps=40, obs_dim=3)
    normalizer = pql.ObsNormalizer(3, 5.0, torch.device("cpu"))
    normalizer.update(buffer.obs.reshape(-1, 3))
    flags = dict(hidden_dims=(32, 16), batch_size=64, distributional=distributional)
    args, old_args = pql.Args(**flags), before.Args(**flags)
    torch.manual_seed(0)
    critic, actor = pql.make_critic(3, 1, args), pql.Actor(3, 1, args.hidden_dims)
    old_critic, old_actor = before.make_critic(3, 1, old_args), before.Actor(3, 1, args.hidden_dims)
    old_actor.load_state_dict(actor.state_dict())
    start_actor_weight = actor.net[0].weight.detach().clone()
    with torch.no_grad():  # layer i of head h: nn.Linear's (out, in) weight is the stack's [h] transposed
        for layer, (weight, bias) in enumerate(zip(critic.q_heads.weights, critic.q_heads.biases)):
            for head, old_head in enumerate([old_critic.q1, old_critic.q2]):
                old_head[2 * layer].weight.copy_(weight[head].T)
                old_head[2 * layer].bias.copy_(bias[head, 0])
    fast = dict(critic=critic, critic_target=copy.deepcopy(critic).requires_grad_(False), actor=actor,
                critic_optimizer=pql.make_optimizer(critic.parameters(), args.critic_lr, capturable=False),
                actor_optimizer=pql.make_optimizer(actor.parameters(), args.actor_lr, capturable=False), module=pql, args=args)
    plain = dict(critic=old_critic, critic_target=copy.deepcopy(old_critic).requires_grad_(False), actor=old_actor,
                 critic_optimizer=torch.optim.AdamW(old_critic.parameters(), lr=args.critic_lr),
                 actor_optimizer=torch.optim.AdamW(old_actor.parameters(), lr=args.actor_lr), module=before, args=old_args)
    assert "fused" not in repr(plain["critic_optimizer"].defaults) or not plain["critic_optimizer"].defaults["fused"]
    draws = pql.RandomDraws(args.batch_size, 8, 0, torch.device("cpu"))
    for v_update in range(1, 17):
        draws.draw()
        batch = buffer.sample(draws, args.nstep, args.gamma, buffer.window)
        draws.draw()
        obs_batch = buffer.sample_obs(draws, buffer.window)
        torch.manual_seed(v_update)
        target_noise = torch.randn(args.batch_size, 1)  # the numbers the code before draws inside its update, from the same seed
        losses = []
        for path in (fast, plain):
            module, path_args = path["module"], path["args"]
            torch.manual_seed(v_update)  # the same target policy noise
            target_policy = copy.deepcopy(path["actor"]).requires_grad_(False)
            noise_argument = (target_noise,) if module is pql else ()
            critic_loss, _, _ = module.update_critic(path["critic"], path["critic_target"], path["critic_optimizer"], target_policy,
                                                     normalizer, batch, *noise_argument, path_args)
            losses.append(critic_loss.item())
            if v_update % 2 == 0:
                policy_critic = copy.deepcopy(path["critic"]).requires_grad_(False)
                losses.append(module.update_actor(path["actor"], path["actor_optimizer"], policy_critic, normalizer, obs_batch,
                                                  path_args).item())
        half = len(losses) // 2
        assert losses[:half] == pytest.approx(losses[half:], rel=1e-5, abs=1e-6), f"V-update {v_update}"
    for name in ["critic", "critic_target"]:
        for layer, (weight, bias) in enumerate(zip(fast[name].q_heads.weights, fast[name].q_heads.biases)):
            for head, old_head in enumerate([plain[name].q1, plain[name].q2]):
                torch.testing.assert_close(weight[head].T, old_head[2 * layer].weight, rtol=1e-4, atol=1e-6)
                torch.testing.assert_close(bias[head, 0], old_head[2 * layer].bias, rtol=1e-4, atol=1e-6)
    for new, old in zip(fast["actor"].parameters(), plain["actor"].parameters()):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-6)
    assert not torch.equal(fast["actor"].net[0].weight, start_actor_weight)  # the updates did change the networks


HOST_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                 "unique_consecutive", "unique_dim", "repeat_interleave"}


class Learners:
    """Both learners of `module` (pql or pql_threaded) as its training loop builds them, on a small
    replay buffer of random transitions on the CPU: v_step() and p_step() run one update each."""

    def __init__(self, module, args, obs_dim=3, act_dim=1, num_envs=8):
        device = torch.device("cpu")
        self.replay_buffer = module.ReplayBuffer(num_envs, 50, obs_dim, act_dim, device)
        for _ in range(30):
            self.replay_buffer.add(torch.randn(num_envs, obs_dim), torch.rand(num_envs, act_dim) * 2 - 1, -torch.rand(num_envs),
                                   torch.randn(num_envs, obs_dim), torch.rand(num_envs) < 0.1, torch.rand(num_envs) < 0.1,
                                   torch.ones(num_envs, dtype=torch.bool))
        self.window = self.replay_buffer.new_window()
        self.replay_buffer.fill_window(self.window)
        self.obs_normalizer = module.ObsNormalizer(obs_dim, 5.0, device)
        self.obs_normalizer.update(torch.randn(100, obs_dim))
        self.actor, self.critic = module.Actor(obs_dim, act_dim, args.hidden_dims), module.make_critic(obs_dim, act_dim, args)
        self.critic_target, self.target_policy, self.policy_critic = (
            copy.deepcopy(net).requires_grad_(False) for net in (self.critic, self.actor, self.critic))
        self.actor_optimizer = module.make_optimizer(self.actor.parameters(), args.actor_lr, capturable=True)  # as --cuda-graphs makes them
        self.critic_optimizer = module.make_optimizer(self.critic.parameters(), args.critic_lr, capturable=True)
        self.stats = {name: torch.zeros(()) for name in
                      ["critic_loss", "q_mean", "outside_support", "critic_nonfinite", "actor_loss", "actor_nonfinite"]}
        self.v_draws = module.RandomDraws(args.batch_size, num_envs, act_dim, device)
        self.p_draws = module.RandomDraws(args.batch_size, num_envs, 0, device)
        self.module, self.args = module, args

    def v_step(self):
        self.module.v_learner_step(self.replay_buffer, self.window, self.v_draws, self.critic, self.critic_target, self.critic_optimizer,
                                   self.target_policy, self.obs_normalizer, self.stats, self.args)

    def p_step(self):
        self.module.p_learner_step(self.replay_buffer, self.window, self.p_draws, self.actor, self.actor_optimizer, self.policy_critic,
                                   self.obs_normalizer, self.stats, self.args)


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
@pytest.mark.parametrize("distributional", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_learner_steps_make_no_host_sync_and_draw_no_random_numbers(script, distributional, bf16):
    """A step that --cuda-graphs records must not wait for the device: no .item(), no Python branch
    on a device value, no boolean-mask indexing (its output size is data-dependent). On a GPU these
    break the capture, or freeze one value into the graph; on the H200 (2026-11-26) only the scalar
    critic's steps were recorded (benchmarks/gpu_check.py now records both). Here every aten op of
    both steps of both scripts is watched on the CPU, and the ops that read a value back to the
    host, or whose output size depends on the data, must not appear.
    Nor may a step draw random numbers (they come drawn, in RandomDraws): a graph that drew them
    would take the GPU generator's state at each replay, and pql_threaded.py's two learners could
    then not replay theirs at the same time. The generator's state must be unchanged by the steps."""
    from torch.utils._python_dispatch import TorchDispatchMode
    module = importlib.import_module(script)

    class WatchForHostSyncs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            masks = [index for index in (args[1] if name in ("index", "index_put", "index_put_") else [])
                     if isinstance(index, torch.Tensor) and index.dtype == torch.bool]
            if name in HOST_SYNC_OPS or masks:
                self.syncs.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    learners = Learners(module, module.Args(hidden_dims=(32, 32), batch_size=64, nstep=3, distributional=distributional, bf16=bf16))
    start_weight = next(learners.critic.parameters()).detach().clone()
    with WatchForHostSyncs() as watch:
        for _ in range(3):
            learners.v_draws.draw()
            learners.p_draws.draw()
            random_state = torch.get_rng_state()
            learners.v_step()
            learners.p_step()
            assert torch.equal(torch.get_rng_state(), random_state), "a learner step drew random numbers"
    assert watch.syncs == []
    assert not torch.equal(next(learners.critic.parameters()), start_weight) and learners.stats["critic_loss"] > 0  # the steps did run
    # The generator check itself: a draw inside a step would change the state.
    random_state = torch.get_rng_state()
    torch.randint(0, 8, (4,))
    assert not torch.equal(torch.get_rng_state(), random_state)
    # The watch itself: a host sync and a boolean mask are both seen.
    with WatchForHostSyncs() as watch:
        x = torch.randn(5)
        x.sum().item()
        x[x > 0]
    assert watch.syncs == ["_local_scalar_dense.default", "index.Tensor"]


@pytest.mark.parametrize("distributional", [False, True])
def test_bf16_multiplies_in_bfloat16_and_keeps_weights_and_losses_in_float32(distributional):
    """--bf16 (torch.autocast): every matrix product of both learner steps, forward and backward,
    runs in bfloat16, while the weights, their gradients, AdamW's moments and the losses stay
    float32; from the same state and draws, its losses stay within bfloat16's precision of the
    float32 steps' losses, and differ from them (the arithmetic did change)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "baddbmm", "matmul", "linear"):
                self.dtypes.append(out.dtype)
            return out

    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        learners = Learners(pql, pql.Args(hidden_dims=(32, 32), batch_size=64, distributional=distributional, bf16=bf16))
        torch.manual_seed(1)  # the same draws for both
        with MatmulDtypes() as watch:
            for _ in range(4):
                learners.v_draws.draw()
                learners.p_draws.draw()
                learners.v_step()
                learners.p_step()
        learners.v_draws.draw()
        batch = learners.replay_buffer.sample(learners.v_draws, learners.args.nstep, learners.args.gamma, learners.window)
        critic_loss, q_mean, _ = pql.update_critic(learners.critic, learners.critic_target, learners.critic_optimizer, learners.target_policy,
                                                   learners.obs_normalizer, batch, learners.v_draws.target_noise, learners.args)
        runs[bf16] = learners, watch.dtypes, critic_loss, q_mean
    (plain, plain_dtypes, *_), (bf16, bf16_dtypes, critic_loss, q_mean) = runs[False], runs[True]
    assert set(plain_dtypes) == {torch.float32} and set(bf16_dtypes) == {torch.bfloat16}
    assert len(bf16_dtypes) == len(plain_dtypes) >= 4 * (2 * 3 + 3 + 2 * 3)  # forward and backward, every layer
    assert critic_loss.dtype == q_mean.dtype == torch.float32
    for network, optimizer in [(bf16.critic, bf16.critic_optimizer), (bf16.actor, bf16.actor_optimizer)]:
        for weight in network.parameters():
            assert weight.dtype == weight.grad.dtype == optimizer.state[weight]["exp_avg"].dtype == torch.float32
    for name in ["critic_loss", "actor_loss"]:
        assert bf16.stats[name].item() == pytest.approx(plain.stats[name].item(), rel=0.05), name
        assert bf16.stats[name].item() != plain.stats[name].item(), name


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_every_learner_step_samples_with_freshly_drawn_numbers(script, monkeypatch, tmp_path):
    """The steps draw nothing themselves, so the training loop must refill each learner's
    RandomDraws before every step: without that, every update would sample the same rows (env 0's
    newest, with zero target noise). A whole run is watched: each learner has draws of its own, used
    from one thread (one stream), and no two consecutive samples of a learner see the same numbers."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    samples = {}  # id of the draws -> [(thread, the numbers they held when sampled)]
    real_sample_rows = module.ReplayBuffer.sample_rows

    def sample_rows(buffer, draws, window):
        samples.setdefault(id(draws), []).append((threading.get_ident(), draws.large_integer.clone()))
        return real_sample_rows(buffer, draws, window)

    monkeypatch.setattr(module.ReplayBuffer, "sample_rows", sample_rows)
    args = module.Args(task="Pendulum", num_envs=8, hidden_dims=(16,), batch_size=32, buffer_size=4000, warmup_iterations=2,
                       total_timesteps=8 * 12, log_interval=50, eval_envs=0)
    cpu = torch.device("cpu")
    env = module.envs.make_env("Pendulum", 8, device=cpu, seed=0)
    assert module.train(args, env, None, cpu if script == "pql" else (cpu, cpu, cpu)) == 0
    assert len(samples) == 2  # the V-learner's draws and the P-learner's
    v_samples, p_samples = sorted(samples.values(), key=len, reverse=True)
    assert len(v_samples) >= 40 and len(p_samples) >= 20
    if script == "pql":
        assert (len(v_samples), len(p_samples)) == (10 * 8, 10 * 4)  # 10 learning iterations of 8 V- and 4 P-updates
    for learner_samples in (v_samples, p_samples):
        assert len({thread for thread, _ in learner_samples}) == 1
        assert all(not torch.equal(a, b) for (_, a), (_, b) in zip(learner_samples, learner_samples[1:]))


@pytest.mark.skipif(pql.torch_release() < (2, 5), reason="--compile needs torch 2.5 or newer")
def test_compile_flag_compiles_both_learner_steps_and_keeps_their_results(monkeypatch, tmp_path):
    """--compile hands v_learner_step and p_learner_step to torch.compile. Here the compiler's
    backend is "eager" (TorchDynamo captures the steps and runs its captured graphs without code
    generation: seconds instead of a minute), so the run must end with the same weights as one
    without the flag, to the bit: what TorchDynamo captures (the in-place statistics, the random
    draws, the sampling window) is what the steps do. Inductor's own code (the real --compile) is
    timed and checked by benchmarks/update_speed.py; it draws its random numbers its own way."""
    monkeypatch.chdir(tmp_path)
    real_compile, compiled = torch.compile, []

    def compile_with_the_eager_backend(function, **options):
        compiled.append(function.__name__)
        return real_compile(function, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_with_the_eager_backend)
    checkpoints = []
    for compile_steps in [False, True]:
        torch.manual_seed(0)
        args = make_args(num_envs=8, buffer_size=4000, warmup_iterations=2, total_timesteps=8 * 12, log_interval=50, eval_envs=0,
                         compile=compile_steps, exp_name=f"compile-{compile_steps}", device="cpu")
        env = pql.envs.make_env("Pendulum", 8, device=torch.device("cpu"), seed=0)
        assert pql.train(args, env, None, torch.device("cpu")) == 0
        (path,) = glob.glob(f"runs/*compile-{compile_steps}*/model.pt")
        checkpoints.append(torch.load(path, weights_only=False))
    assert compiled == ["v_learner_step", "p_learner_step"]
    for part in ["actor", "critic", "critic_target"]:
        for name, value in checkpoints[0][part].items():
            assert torch.equal(value, checkpoints[1][part][name]), f"{part}.{name}"
    critic, critic_target = checkpoints[1]["critic"], checkpoints[1]["critic_target"]
    assert not torch.equal(critic["q_heads.weights.0"], critic_target["q_heads.weights.0"])  # updates ran (they start equal)


# ---------------------------------------------------------------------------------------------
# The script as users run it
# ---------------------------------------------------------------------------------------------
SMALL = ["--task", "Pendulum", "--num-envs", "16", "--hidden-dims", "32", "32", "--batch-size", "64",
         "--buffer-size", "16000", "--device", "cpu", "--warmup-iterations", "4", "--log-interval", "5"]


def run_pql(args, cwd, timeout=300):
    return subprocess.run([sys.executable, os.path.join(REPO, "pql.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def main_in_process(module, argv, monkeypatch, capsys):
    """Run a script's main() in this process, which spares the seconds of a new interpreter and its
    imports; return the exit code and what went to stderr."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    handlers = {stop_signal: signal.getsignal(stop_signal) for stop_signal in (signal.SIGINT, signal.SIGTERM)}
    try:
        return module.main(), capsys.readouterr().err
    finally:
        for stop_signal, handler in handlers.items():
            signal.signal(stop_signal, handler)  # main() installs its own


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir)
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cli_tiny_run_writes_scalars_checkpoint_and_evaluates(tmp_path):
    # 400 iterations, 2 episode ends (at 200 and 400), logged every 30 iterations and after the last.
    result = run_pql(SMALL + ["--total-timesteps", "6400", "--log-interval", "30"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sized for a GPU" not in result.stderr
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "Pendulum__pql__1__*"))
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/v_updates_per_s",
                "losses/critic_loss", "losses/actor_loss", "losses/q_mean", "eval/episodic_return"]:
        assert scalars.get(tag), f"{tag} missing"
    assert [step for step, _ in scalars["charts/SPS"]] == [30 * 16 * i for i in range(1, 14)] + [6400]
    assert [step for step, _ in scalars["charts/episodic_return"]] == [210 * 16, 6400]
    assert [value for _, value in scalars["charts/episodic_length"]] == [200.0, 200.0]
    # The deterministic policy's return, from its own envs: logged where their episodes end, like the training return.
    assert [step for step, _ in scalars["eval/episodic_return"]] == [step for step, _ in scalars["charts/episodic_return"]]
    assert all(-2000 < value < 0 for _, value in scalars["charts/episodic_return"])
    checkpoint = torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)
    assert checkpoint["global_step"] == 6400 and checkpoint["args"]["hidden_dims"] == (32, 32)
    assert {"actor", "critic", "critic_target", "obs_normalizer"} <= set(checkpoint)
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))

    evaluation = run_pql(["--eval-checkpoint", os.path.join(run_dir, "model.pt"), "--eval-episodes", "3", "--device", "cpu"], tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr
    assert "mean return" in evaluation.stdout and "over 3 episodes (mean length 200.0)" in evaluation.stdout


def test_same_seed_gives_identical_returns_on_cpu(tmp_path):
    # The two runs at once, one torch thread each (on 2 cores, twice as fast as one after the other).
    runs = {name: subprocess.Popen([sys.executable, os.path.join(REPO, "pql.py"), *SMALL, "--total-timesteps", "3440",  # one episode end
                                    "--exp-name", name], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
            for name in ["a", "b"]}
    returns = []
    try:
        for name, process in runs.items():
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            (run_dir,) = glob.glob(str(tmp_path / "runs" / f"Pendulum__{name}__1__*"))
            scalars = read_scalars(run_dir)
            returns.append([scalars[tag] for tag in ["charts/episodic_return", "losses/critic_loss"]])
    finally:
        for process in runs.values():
            process.kill()  # no-op for a process that has ended
            process.wait()
    assert returns[0][0] and returns[0] == returns[1]


@pytest.mark.parametrize("flags, message", [
    (["--num-envs", "0"], "--num-envs"),
    (["--batch-size", "20000", "--buffer-size", "10000"], "--batch-size"),
    (["--nstep", "0"], "--nstep"),
    (["--std-min", "0.9", "--std-max", "0.1"], "--std-min"),
    (["--critic-lr", "-1"], "--critic-lr"),
    (["--actor-lr", "0"], "--actor-lr"),
    (["--v-updates-per-env-step", "0"], "--v-updates-per-env-step"),
    (["--v-updates-per-p-update", "0"], "--v-updates-per-p-update"),
    (["--task", "NoSuchTask"], "Pendulum"),  # the error lists the tasks
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--buffer-size", str(10**13)], "--buffer-size"),  # does not fit in memory
    (["--eval-checkpoint", "no/such/model.pt"], "--eval-checkpoint"),
    (["--eval-envs", "-1"], "--eval-envs"),
    (["--pre-tanh-bound", "0"], "--pre-tanh-bound"),
    (["--task", "isaacgym:Ant", "--eval-envs", "2"], "--eval-envs must be 0 for isaacgym"),
])
def test_bad_flags_fail_before_any_work_naming_the_flag(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    returncode, err = main_in_process(pql, ["--device", "cpu", *flags], monkeypatch, capsys)
    assert returncode == 2  # an exception instead would fail the test with its traceback
    assert message in err
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_compile_needs_torch_2_5(tmp_path, monkeypatch, capsys, script):
    """Torch 2.4's TorchDynamo recompiled the updates at every step until its cache was full (seen
    with torch 2.4.1; 2.5.1, 2.6.0 and 2.13.0 stop after the first steps): --compile is refused there before any
    work. The versions compare as numbers (as strings, "2.13.0" would sort before "2.5"), and a
    pre-release or vendor's build of 2.5 counts as 2.5."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    for version, accepted in [("2.4.1+cu121", False), ("2.0.1", False), ("2.5.1", True), ("2.13.0+cpu", True), ("10.0.0", True),
                              ("2.5.0a0+e000cf0ad9.nv24.10", True), ("2.4.0a0+git123", False)]:
        monkeypatch.setattr(torch, "__version__", version)
        args = module.parse_args(["--compile"])
        if accepted:
            module.validate_args(args)
        else:
            with pytest.raises(ValueError, match=f"--compile needs torch 2.5 or newer \\(this is torch {re.escape(version)}\\)"):
                module.validate_args(args)
        module.validate_args(module.parse_args([]))  # without --compile, any version
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    returncode, err = main_in_process(module, ["--device", "cpu", "--compile"], monkeypatch, capsys)
    assert returncode == 2 and "--compile needs torch 2.5" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
@pytest.mark.parametrize("task, eval_envs, built", [
    ("Pendulum", None, 4), ("gym:Hopper-v5", None, 4),  # evaluation envs by default
    ("mjlab:Mjlab-Cartpole-Balance", None, 0), ("isaacgym:Ant", None, 0),  # none by default for the simulators
    ("mjlab:Mjlab-Cartpole-Balance", 2, 2), ("Pendulum", 0, 0),  # the flag decides when given
])
def test_evaluation_envs_by_default_except_for_the_simulators(monkeypatch, script, task, eval_envs, built):
    """A second mjlab simulator's step costs much of the training envs' (Isaac Gym allows only one):
    by default the simulators' tasks run no evaluation envs. Checked without building any env."""
    module = importlib.import_module(script)
    made = []
    monkeypatch.setattr(module.envs, "make_env", lambda task, num_envs, **kwargs: made.append((task, num_envs)) or types.SimpleNamespace())
    eval_env = module.make_eval_env(module.Args(task=task, eval_envs=eval_envs), torch.device("cpu"))
    assert made == ([(task, built)] if built else []) and (eval_env is None) == (built == 0)


def poison_env_step(env, poisoned, from_iteration, once):
    """Make env.step return NaN in one of its outputs (next_obs, final_obs or reward) at iteration
    from_iteration (1-based) and, unless once, at every iteration after it."""
    real_step, iteration = env.step, [0]

    def poisoned_step(actions):
        next_obs, reward, terminated, truncated, info = real_step(actions)
        iteration[0] += 1
        if iteration[0] == from_iteration or (iteration[0] > from_iteration and not once):
            if poisoned == "next_obs":
                next_obs = next_obs * float("nan")
            elif poisoned == "final_obs":  # as a physics blow-up that ends an episode would show
                info = {**info, "final_obs": info["final_obs"].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
            elif poisoned == "episode_return":  # an evaluation env's episode that blew up
                info = {**info, "episode_return": info["episode_return"].clone().index_fill_(0, torch.tensor([1]), float("nan"))}
            else:
                reward = reward.clone().index_fill_(0, torch.tensor([5]), float("nan"))
        return next_obs, reward, terminated, truncated, info

    env.step = poisoned_step


@pytest.mark.parametrize("poisoned, once", [("next_obs", False), ("final_obs", True), ("reward", True)])
def test_nonfinite_values_stop_at_their_step_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, poisoned, once):
    """An env that returns a NaN observation, a NaN true last observation (what goes into the buffer
    where an episode ends) or a NaN reward at iteration 13 must stop the run with that step and leave
    the checkpoint of the last logging interval before it. During warm-up (20 iterations) nothing
    samples the buffer, so only the env's outputs themselves can show it that early."""
    monkeypatch.chdir(tmp_path)
    env = pql.envs.make_env("Pendulum", 8, device="cpu", seed=0)
    poison_env_step(env, poisoned, from_iteration=14, once=once)
    args = make_args(num_envs=8, buffer_size=8000, warmup_iterations=20, log_interval=5, save_interval=1e-9, device="cpu",
                     total_timesteps=8 * 30)
    assert pql.train(args, env, None, torch.device("cpu")) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "env step 112 (iteration 13)" in err
    (checkpoint_path,) = glob.glob("runs/*/model.pt")
    assert torch.load(checkpoint_path, weights_only=False)["global_step"] == 10 * 8  # saved at iteration 10, not 15


def test_a_nonfinite_statistic_stops_the_run_before_it_is_logged(tmp_path, monkeypatch, capsys):
    """A NaN return from an evaluation env (its own simulator, the deterministic policy) at iteration 13
    must stop the run at the next log, naming the statistic, instead of writing NaN to TensorBoard."""
    monkeypatch.chdir(tmp_path)
    env = pql.envs.make_env("Pendulum", 8, device="cpu", seed=0)
    eval_env = pql.envs.make_env("Pendulum", 4, device="cpu", seed=10_000)
    poison_env_step(eval_env, "episode_return", from_iteration=14, once=True)
    args = make_args(num_envs=8, buffer_size=8000, warmup_iterations=20, log_interval=5, save_interval=1e-9, device="cpu",
                     total_timesteps=8 * 30)
    assert pql.train(args, env, eval_env, torch.device("cpu")) == 1
    err = capsys.readouterr().err
    assert "non-finite statistic (eval_return_sum) before env step 120" in err
    (run_dir,) = glob.glob("runs/*")
    assert torch.load(os.path.join(run_dir, "model.pt"), weights_only=False)["global_step"] == 10 * 8
    assert all(math.isfinite(value) for series in read_scalars(run_dir).values() for _, value in series)


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
@pytest.mark.parametrize("flags, tf32", [([], True), (["--no-tf32"], False)])
def test_tf32_is_on_by_default_and_off_with_no_tf32(tmp_path, monkeypatch, capsys, script, flags, tf32):
    """torch's switch for TF32 matrix products on CUDA is set from --tf32, on by default (it does
    nothing on a CPU, so a CPU run sets it too)."""
    monkeypatch.chdir(tmp_path)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    try:
        returncode, err = main_in_process(importlib.import_module(script), [*SMALL, "--total-timesteps", "64", *flags], monkeypatch, capsys)
        assert returncode == 0, err
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_gpu_sized_settings_on_a_cpu_get_a_one_line_notice(tmp_path):
    result = run_pql(["--device", "cpu", "--num-envs", "4096", "--total-timesteps", "4096", "--hidden-dims", "8",
                      "--batch-size", "64", "--buffer-size", "40960"], tmp_path)  # one warm-up iteration
    assert result.returncode == 0, result.stderr
    (notice,) = [line for line in result.stderr.splitlines() if "sized for a GPU" in line]
    assert "--num-envs 4096" in notice and "python pql.py --task Pendulum --num-envs 64" in notice


def test_checkpoints_refuse_nonfinite_weights(tmp_path):
    """save_checkpoint writes nothing when a weight or a statistic is not finite, so a diverged run
    keeps its last good checkpoint."""
    args = make_args()
    actor, critic = pql.Actor(3, 1, (8,)), pql.make_critic(3, 1, args)
    normalizer = pql.ObsNormalizer(3, 5.0, torch.device("cpu"))
    path = str(tmp_path / "model.pt")
    assert pql.save_checkpoint(path, actor, critic, copy.deepcopy(critic), normalizer, args, 1)
    for poisoned in [actor.net[0].weight, critic.q_heads.biases[-1], normalizer.var]:
        with torch.no_grad():
            saved = poisoned.clone()
            poisoned[0] = float("nan")
        assert not pql.save_checkpoint(path, actor, critic, copy.deepcopy(critic), normalizer, args, 2)
        assert torch.load(path, weights_only=False)["global_step"] == 1  # the good one is kept
        with torch.no_grad():
            poisoned.copy_(saved)
    assert not os.path.exists(path + ".tmp")


def restore_default_sigint():
    """A shell's background job starts with SIGINT ignored, and Python then keeps ignoring it;
    give the child the default, as a terminal's Ctrl-C would find it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
@pytest.mark.parametrize("stop_signal, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_signal_while_setting_up_exits_with_its_code_and_no_traceback(tmp_path, monkeypatch, capsys, script, stop_signal, exit_code):
    """Ctrl-C or SIGTERM before the training loop (building the envs, which takes a minute for some
    simulators; recording CUDA graphs; compiling) ends the run at once with the signal's exit code
    (130, 143) and a one-line message, not a traceback."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    real_make_env = module.envs.make_env

    def make_env_interrupted(*args, **kwargs):
        os.kill(os.getpid(), stop_signal)  # delivered here, in the main thread, as the env is built
        return real_make_env(*args, **kwargs)

    monkeypatch.setattr(module.envs, "make_env", make_env_interrupted)
    # A process started in the background (as CI may start pytest) has Ctrl-C ignored, and main() keeps
    # that; a user's terminal does not: Python's own handler here, so that main() installs its own.
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        returncode, err = main_in_process(module, SMALL + ["--total-timesteps", "64"], monkeypatch, capsys)
    except KeyboardInterrupt:  # SIGTERM's Terminated is one too; left to escape, it would stop pytest itself
        pytest.fail("the stop signal escaped main() as an exception")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    assert returncode == exit_code
    assert f"interrupted ({stop_signal.name}) before training started: no checkpoint written" in err and "Traceback" not in err
    assert not glob.glob("runs/*/model.pt")


TRAINING_STARTED = re.compile(r"(?<![0-9])0%\|.*step")  # the progress bar's first frame: "  0%|   | 0.00/100M [00:00<?, ?step/s]"


def interrupt_run(script, args, tmp_path, signal_to_send=signal.SIGINT):
    """Start a long run, send SIGINT (Ctrl-C) or another signal once it is training, and again every
    10 ms until its checkpoint is saved, as an impatient user does; return its exit code, stderr,
    the global step of the checkpoint it left, and the seconds from the first signal to the exit.
    A signal sent just after the save, while the process exits, is ignored too (exit_ignoring_stop_signals)."""
    stderr_path = tmp_path / "stderr.txt"  # a file, to watch for the progress bar while the run goes on
    with open(stderr_path, "w") as stderr_file:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, script), *args, "--total-timesteps", "100000000"],
                                   cwd=tmp_path, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                   preexec_fn=restore_default_sigint)
    try:
        deadline = time.time() + 120
        while not TRAINING_STARTED.search(stderr_path.read_text()) and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert TRAINING_STARTED.search(stderr_path.read_text()), stderr_path.read_text()[-3000:]
        time.sleep(3)  # well into the training loop
        process.send_signal(signal_to_send)
        signalled = time.time()

        def saved():
            return any(os.path.getmtime(path) >= signalled for path in glob.glob(str(tmp_path / "runs" / "*" / "model.pt")))

        while process.poll() is None and not saved() and time.time() < signalled + 60:
            process.send_signal(signal_to_send)
            time.sleep(0.01)
        process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()  # reaped, whichever way the test went
    err = stderr_path.read_text()
    seconds_to_exit = time.time() - signalled
    checkpoints = glob.glob(str(tmp_path / "runs" / "*" / "model.pt"))
    global_step = torch.load(checkpoints[0], weights_only=False)["global_step"] if len(checkpoints) == 1 else None
    return process.returncode, err, global_step, seconds_to_exit


@pytest.mark.parametrize("signal_to_send, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_the_checkpoint_and_exit_cleanly(tmp_path, signal_to_send, exit_code):
    """Ctrl-C, and SIGTERM (kill, a SLURM time limit, a container stop), save and exit with 128 + the
    signal; more of them while it saves are ignored, and the checkpoint is the one of the step it stopped at."""
    returncode, err, global_step, seconds_to_exit = interrupt_run("pql.py", SMALL, tmp_path, signal_to_send)
    assert returncode == exit_code, err
    assert f"({signal_to_send.name}); saving" in err and "Traceback" not in err
    assert f"interrupted at env step {global_step} " in err and global_step > 0
    assert seconds_to_exit < 45  # the last log, the save and the exit, with room for a loaded machine
    # The signal only ends the loop at the end of its iteration, which logs the last stretch too.
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    assert read_scalars(run_dir)["charts/SPS"][-1][0] == global_step


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_a_late_ctrl_c_cannot_turn_the_exit_into_a_kill(script):
    # The scripts end with exit_ignoring_stop_signals(main()): a signal ignored by then stays ignored
    # while the interpreter exits (one handled by Python would get its default action back, and a
    # Ctrl-C a moment after the final save would end the process as killed by SIGINT).
    module = importlib.import_module(script)
    handlers = {stop_signal: signal.getsignal(stop_signal) for stop_signal in (signal.SIGINT, signal.SIGTERM)}
    try:
        module.catch_stop_signals()
        with pytest.raises(SystemExit) as exit_info:
            module.exit_ignoring_stop_signals(130)
        assert exit_info.value.code == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for stop_signal, handler in handlers.items():
            signal.signal(stop_signal, handler)
    source = open(os.path.join(REPO, f"{script}.py")).read()
    assert source.rstrip().endswith('if __name__ == "__main__":\n    exit_ignoring_stop_signals(main())')


def test_progress_bar_in_a_log_file_refreshes_once_per_interval_and_no_more(monkeypatch):
    """Output to a file: one refresh per interval (a minute in the scripts, half a second here), none
    added between them by tqdm's monitor thread (which checks every ten seconds, here every 0.05)."""
    import tqdm as tqdm_module

    def fresh_monitor():  # the monitor thread is tqdm's, started with the first bar after this
        if tqdm_module.tqdm.monitor is not None:
            tqdm_module.tqdm.monitor.exit()
            tqdm_module.tqdm.monitor = None

    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(tqdm_module.tqdm, "monitor_interval", 0.05)
    monkeypatch.setattr(sys, "stderr", log)
    fresh_monitor()
    try:
        bar = pql.progress_bar(10**6)
        bar.mininterval, bar.maxinterval = 0.5, 0.05  # the scripts' minute and tqdm's ten seconds, scaled
        started = bar.last_print_t  # the first frame's time
        while time.time() - started < 2.6:
            bar.update(64)
            time.sleep(0.005)
        elapsed = time.time() - started
        bar.close()
    finally:
        fresh_monitor()
    assert 3 <= log.getvalue().count("\r") <= 2 + elapsed // 0.5  # the first frame, one per interval, the last


PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # looked up here, not in a forked child


def end_with_parent():
    """A child's preexec_fn: on Linux the kernel kills the child when the process that started it
    ends, however it ends (pytest killed by a CI time limit leaves no training runs behind)."""
    if PRCTL is not None:
        PRCTL(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def start_learning_run(script, extra_flags, cwd, one_thread=False, background=False):
    """Start training Pendulum with small settings, a fixed seed and a fixed budget of env steps.
    `background`: at the lowest CPU priority (nice 19), so that it only takes time no other work wants,
    and ended with this process (end_with_parent), since it may outlive the test that started it."""
    lowest_priority = ["nice", "-n", "19"] if background and shutil.which("nice") else []
    process = subprocess.Popen([*lowest_priority, sys.executable, os.path.join(REPO, script), "--task", "Pendulum", "--num-envs", "64",
                                "--hidden-dims", "64", "64", "--batch-size", "1024", "--device", "cpu",
                                "--total-timesteps", "51200", "--seed", "1", *extra_flags],
                               cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1") if one_thread else None,
                               preexec_fn=end_with_parent if background else None)
    process.started_at = time.time()
    return process


def deterministic_return(training, cwd):
    """Wait for a learning run to end, then return its deterministic policy's mean return over 20 episodes."""
    _, err = training.communicate(timeout=1200)
    assert training.returncode == 0, err
    # Captured output is not a terminal: the progress bar refreshes once a minute, not ten times a second.
    minutes = (time.time() - training.started_at) / 60
    assert err.count("\r") <= 6 + minutes, (err.count("\r"), minutes)
    (run_dir,) = glob.glob(os.path.join(str(cwd), "runs", "*"))
    evaluation = run_pql(["--eval-checkpoint", os.path.join(run_dir, "model.pt"), "--eval-episodes", "20", "--device", "cpu"], cwd)
    return float(evaluation.stdout.split("mean return ")[1].split()[0])


def learned_mean_return(script, extra_flags, tmp_path):
    return deterministic_return(start_learning_run(script, extra_flags, tmp_path), tmp_path)


def test_learns_pendulum(pql_pendulum_returns):
    """The deterministic policy must swing the pendulum up (random: about -1250; solved: -150 to -200)."""
    assert pql_pendulum_returns["scalar"] > -400


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_task_defaults_apply_when_the_task_is_named_and_flags_still_win(script):
    """`--task gym:Hopper-v5` alone gives the settings of TASK_DEFAULTS for it; a flag on the command
    line wins even when it repeats Args' own default; other tasks keep Args' defaults."""
    module = importlib.import_module(script)
    hopper = module.TASK_DEFAULTS["gym:Hopper-v5"]
    for argv in (["--task", "gym:Hopper-v5"], ["--task=gym:Hopper-v5", "--seed", "3"]):
        args = module.parse_args(argv)
        assert all(getattr(args, name) == value for name, value in hopper.items()), argv
    assert hopper["num_envs"] != 4096 and module.Args().num_envs == 4096
    args = module.parse_args(["--task", "gym:Hopper-v5", "--num-envs", "4096", "--reward-scale", "0.5"])
    assert (args.num_envs, args.reward_scale, args.batch_size) == (4096, 0.5, hopper["batch_size"])
    plain = module.parse_args(["--task", "Reacher"])
    assert (plain.num_envs, plain.hidden_dims, plain.reward_scale) == (4096, (512, 256, 128), 0.1)
    # Every entry names flags that exist, with values the flag checks accept.
    for task, settings in module.TASK_DEFAULTS.items():
        assert set(settings) <= set(module.Args.__dataclass_fields__), task
        module.validate_args(module.parse_args(["--task", task]))


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_a_bare_task_flag_gets_tyros_error_not_a_one_flag_usage_line(script, capsys):
    # The small parser that looks for the task's defaults first must leave the error to tyro, whose
    # message points to the full --help, instead of printing a usage line that knows only --task.
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--seed", "3", "--task"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--task" in err and "--help" in err
    assert "[--task TASK]" not in err
