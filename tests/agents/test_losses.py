"""GAE, the PPO losses and the KL controller against hand-computed values on fixed tensors."""

import math

import pytest
import torch

from agents.kl_controllers import AdaptiveKLController, FixedKLController
from agents.losses import explained_variance, gae, masked_mean, masked_whiten, policy_loss, value_loss


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 3.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]])  # the 9 sits on padding and must be ignored
    mask = torch.tensor([[True, True, True], [True, True, False]])
    gamma, lam = 0.9, 0.8
    # Episode 0: deltas with V after the end = 0.
    d2 = 2.0 + 0.0 - 1.5
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.72 * a2
    a0 = d0 + 0.72 * a1
    # Episode 1 ends after two tokens.
    e1 = 3.0 - 1.0
    e0 = 0.5 + 0.9 * 1.0 - 2.0
    b1 = e1
    b0 = e0 + 0.72 * b1
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2], [b0, b1, 0.0]]))
    torch.testing.assert_close(
        returns, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5], [b0 + 2.0, b1 + 1.0, 0.0]])
    )


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 1.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.9 - 0.3, 0.8 - 0.2, 1.0 - 0.1]]))


def test_clipped_policy_loss_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.55, 0.25, 0.4]]))  # ratios 1.5, 1.1, 0.5, 0.8
    adv = torch.tensor([[1.0, 1.0, -2.0, 3.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)): r=1.5,A=1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # r=1.1,A=1 -> max(-1.1, -1.1) = -1.1; r=0.5,A=-2 -> max(1.0, 1.6) = 1.6 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 1.6) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    ratios = torch.tensor([1.5, 1.1, 0.5])
    assert stats["approx_kl"].item() == pytest.approx(float(((ratios - 1) - ratios.log()).mean()), rel=1e-5)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 0.0]])
    old = torch.tensor([[0.5, 2.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    # token 0: V=1 (clipped to 0.7): max((1-2)^2, (0.7-2)^2) = 1.69; token 1: V=2 vs clip 2.3: max(1, 1.69) = 1.69
    assert value_loss(values, old, returns, mask, clip_range=0.2).item() == pytest.approx(
        0.5 * (1.69 + 1.69) / 2
    )
    assert value_loss(values, old, returns, mask, clip_range=None).item() == pytest.approx(
        0.5 * (1.0 + 1.0) / 2
    )


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    white = masked_whiten(x, mask)
    std = math.sqrt(((1.5**2 + 0.5**2) * 2) / 3)  # unbiased over the 4 real entries
    torch.testing.assert_close(
        white, torch.tensor([[-1.5 / std, -0.5 / std, 0.0], [0.5 / std, 1.5 / std, 0.0]])
    )
    assert explained_variance(x, x, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 2.5), x, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9 is 50% over target: the error is clipped to +0.2; n_steps 512 -> beta * (1 + 0.2 * 512 / 10000)
    assert controller.update(9.0, 512) == pytest.approx(0.1 * (1 + 0.2 * 0.0512))
    # KL 5.7 is 5% under target: beta * (1 - 0.05 * 100 / 10000)
    value = controller.value
    assert controller.update(5.7, 100) == pytest.approx(value * (1 - 0.05 * 0.01))
    assert controller.update(float("nan"), 100) == pytest.approx(
        value * (1 - 0.05 * 0.01)
    )  # unknown KL: no change
    fixed = FixedKLController(0.2)
    assert fixed.update(100.0, 1000) == 0.2
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
