"""PQL-D: the C51 projection against the textbook loop (Bellemare et al. 2017, Algorithm 1),
its edge cases, the distributional critic update, and learning with --distributional."""
import importlib
import math
import types

import pytest
import torch

import pql


def loop_projection(probs, rewards, discounts, atoms):
    """Algorithm 1 of the C51 paper, one atom at a time, in float64."""
    v_min, v_max, num_atoms = atoms[0].item(), atoms[-1].item(), len(atoms)
    delta = (v_max - v_min) / (num_atoms - 1)
    out = torch.zeros(probs.shape, dtype=torch.float64)
    for i in range(probs.shape[0]):
        for j in range(num_atoms):
            shifted = min(max(rewards[i].item() + discounts[i].item() * atoms[j].item(), v_min), v_max)
            b = (shifted - v_min) / delta
            lower, upper = math.floor(b), math.ceil(b)
            if lower == upper:
                out[i, lower] += probs[i, j].item()
            else:
                out[i, lower] += probs[i, j].item() * (upper - b)
                out[i, upper] += probs[i, j].item() * (b - lower)
    return out


def random_probs(batch, num_atoms, generator):
    return torch.softmax(torch.randn(batch, num_atoms, generator=generator, dtype=torch.float64) * 2, dim=1)


@pytest.mark.parametrize("v_min, v_max, num_atoms", [(-10.0, 10.0, 51), (-4.0, 4.0, 9), (0.0, 3.0, 2)])
def test_projection_matches_the_loop_on_random_inputs(v_min, v_max, num_atoms):
    generator = torch.Generator().manual_seed(0)
    atoms = torch.linspace(v_min, v_max, num_atoms, dtype=torch.float64)
    probs = random_probs(64, num_atoms, generator)
    rewards = (torch.rand(64, generator=generator, dtype=torch.float64) - 0.5) * 2 * (v_max - v_min)  # some beyond the support
    discounts = 0.99 ** torch.randint(1, 4, (64,), generator=generator).double()
    discounts[::5] = 0.0  # terminations
    projected = pql.project_onto_atoms(probs, rewards, discounts, atoms)
    torch.testing.assert_close(projected, loop_projection(probs, rewards, discounts, atoms))
    torch.testing.assert_close(projected.sum(1), torch.ones(64, dtype=torch.float64))


def test_projection_edges():
    atoms = torch.linspace(-4.0, 4.0, 9, dtype=torch.float64)  # spacing 1: exact in floating point
    probs = torch.softmax(torch.arange(9, dtype=torch.float64), dim=0).repeat(6, 1)
    rewards = torch.tensor([1.0, 0.0, -4.0, 4.0, 100.0, -1.5], dtype=torch.float64)
    discounts = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.9, 0.5], dtype=torch.float64)
    projected = pql.project_onto_atoms(probs, rewards, discounts, atoms)
    torch.testing.assert_close(projected, loop_projection(probs, rewards, discounts, atoms))
    # A shift by exactly one atom: every mass lands on an interior atom and must not be doubled.
    expected = torch.cat([torch.zeros(1, dtype=torch.float64), probs[0, :7], probs[0, 7:].sum(0, keepdim=True)])
    torch.testing.assert_close(projected[0], expected)
    # Terminal (discount 0): everything on the reward's atom; exactly at v_min and at v_max too.
    assert projected[1].tolist() == pytest.approx([0, 0, 0, 0, 1, 0, 0, 0, 0])
    assert projected[2, 0].item() == pytest.approx(1.0) and projected[3, -1].item() == pytest.approx(1.0)
    # Beyond the support: clamped onto v_max.
    assert projected[4, -1].item() == pytest.approx(1.0)
    # Inside the support the mean is preserved: E[projected] = r + discount * E[Z].
    mean_z = (probs[5] * atoms).sum()
    assert (projected[5] * atoms).sum().item() == pytest.approx(-1.5 + 0.5 * mean_z.item())
    torch.testing.assert_close(projected.sum(1), torch.ones(6, dtype=torch.float64))


def test_projection_preserves_the_mean_with_nstep_discounts():
    generator = torch.Generator().manual_seed(1)
    atoms = torch.linspace(-10.0, 10.0, 51, dtype=torch.float64)
    probs = random_probs(32, 51, generator)
    discounts = 0.99 ** torch.randint(1, 6, (32,), generator=generator).double()  # gamma^k for windows k = 1..5
    rewards = torch.rand(32, generator=generator, dtype=torch.float64) * 0.05  # small: every shifted atom stays inside
    probs[:, -3:] = 0.0  # no mass near v_max, so nothing is clamped
    probs /= probs.sum(1, keepdim=True)
    projected = pql.project_onto_atoms(probs, rewards, discounts, atoms)
    torch.testing.assert_close((projected * atoms).sum(1), rewards + discounts * (probs * atoms).sum(1))


def test_support_is_a_module_buffer():
    critic = pql.Critic(3, 1, (8,), distributional=True, num_atoms=11, v_min=-2.0, v_max=3.0)
    assert "atoms" in dict(critic.named_buffers()) and "atoms" in critic.state_dict()
    assert critic.atoms.tolist() == pytest.approx(torch.linspace(-2.0, 3.0, 11).tolist())
    moved = critic.to(torch.float64)  # .to() moves buffers along (device moves the same way)
    assert moved.atoms.dtype == torch.float64


def test_distributional_critic_update_uses_the_lower_target_and_cross_entropy():
    torch.manual_seed(0)
    args = pql.Args(hidden_dims=(16,), distributional=True, num_atoms=11, v_min=-5.0, v_max=5.0, target_policy_noise=0.0)
    critic = pql.make_critic(3, 1, args)
    critic_target = pql.make_critic(3, 1, args).requires_grad_(False)
    policy = pql.Actor(3, 1, args.hidden_dims)
    normalizer = pql.ObsNormalizer(3, clip=5.0, device=torch.device("cpu"))
    batch = (torch.randn(16, 3), torch.rand(16, 1) * 2 - 1, torch.randn(16), torch.randn(16, 3),
             torch.tensor([0.0, 0.97] * 8), torch.ones(16))
    with torch.no_grad():  # the expected loss, computed here with the loop projection
        obs, actions, reward, bootstrap_obs, discount, _ = batch
        l1, l2 = critic_target.logits(bootstrap_obs, policy(bootstrap_obs))
        p1, p2 = torch.softmax(l1, 1), torch.softmax(l2, 1)
        lower = torch.where(((p1 * critic.atoms).sum(1) < (p2 * critic.atoms).sum(1))[:, None], p1, p2)
        target = loop_projection(lower.double(), reward.double(), discount.double(), critic.atoms.double()).float()
        c1, c2 = critic.logits(obs, actions)
        expected = -(target * (torch.log_softmax(c1, 1) + torch.log_softmax(c2, 1))).sum(1).mean()
    optimizer = torch.optim.SGD(critic.parameters(), lr=0.0)
    loss, q_mean, outside = pql.update_critic(critic, critic_target, optimizer, policy, normalizer, batch, torch.zeros(16, 1), args)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert q_mean.item() == pytest.approx(critic.mean_value(c1).mean().item(), rel=1e-5)
    assert 0.0 <= outside.item() <= 1.0


def test_learns_pendulum_distributional(pql_pendulum_returns):
    assert pql_pendulum_returns["distributional"] > -400


@pytest.mark.parametrize("script", ["pql", "pql_threaded"])
def test_the_support_warning_comes_once_per_run_also_for_a_second_run_in_one_process(tmp_path, monkeypatch, script):
    """Targets outside [--v-min, --v-max] are reported once per run (the scalar keeps the record),
    and a second run in the same process (tests, a notebook) is warned again."""
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    args = module.Args(distributional=True)
    values = {"episodes": 0, "v_updates": 4, "critic_loss": 1.0, "q_mean": 0.0, "outside_support": 0.8, "p_updates": 0,
              "eval_episodes": 0}
    warnings = []
    progress = types.SimpleNamespace(write=warnings.append, set_postfix=lambda **kwargs: None)
    for run in range(2):
        writer, _ = module.start_run(args, 1.0)
        for step in range(3):
            module.write_scalars(writer, values, step + 1, 4, 1.0, float("nan"), progress, args)
        writer.close()
        assert len(warnings) == run + 1 and "20% of the critic's targets" in warnings[-1] and "outside [--v-min, --v-max]" in warnings[-1]
