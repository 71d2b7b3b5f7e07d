"""REINFORCE++: per-token returns with the KL in the reward, normalised over the batch (by hand); it learns."""

import pytest
import torch

from agents.reinforce_pp import (
    ReinforcePPAgent,
    ReinforcePPConfig,
    reinforce_pp_advantages,
    reinforce_pp_loss,
)

# two responses: per-token KL penalties and the score on the last token
REWARDS = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, 5.0]])  # 5.0 is padding
MASK = torch.tensor([[True, True, True], [True, True, False]])


def whiten(values):
    values = torch.tensor(values)
    return (values - values.mean()) / torch.sqrt(values.var() + 1e-8)  # Bessel, as masked_whiten


def test_returns_are_whitened_over_the_whole_batch():
    # returns-to-go: [0.8, 0.9, 1.0] and [1.8, 2.0]; mean 1.3 and std over all 5 tokens
    expected = whiten([0.8, 0.9, 1.0, 1.8, 2.0])
    advantages = reinforce_pp_advantages(REWARDS, MASK)
    torch.testing.assert_close(advantages[MASK], expected)
    assert advantages[1, 2] == 0.0
    # discounted: G_t = r_t + gamma G_{t+1}
    discounted = reinforce_pp_advantages(REWARDS, MASK, gamma=0.5)
    torch.testing.assert_close(
        discounted[MASK], whiten([-0.1 - 0.05 + 0.25, -0.1 + 0.5, 1.0, -0.2 + 1.0, 2.0])
    )


def test_baseline_variant_subtracts_the_group_mean_score_first():
    baseline = torch.tensor([1.5, 1.5])  # the group's mean score, subtracted from each last-token reward
    expected = whiten([-0.7, -0.6, -0.5, 0.3, 0.5])
    torch.testing.assert_close(reinforce_pp_advantages(REWARDS, MASK, baseline=baseline)[MASK], expected)


def test_loss_is_the_token_level_clipped_surrogate():
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    advantages = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, 0.0]])
    loss, _ = reinforce_pp_loss(logprobs, old, advantages, MASK)
    assert float(loss) == pytest.approx((-1.2 - 2.0 - 3.0 + 1.0 + 2.0) / 5)


@pytest.mark.slow
def test_reinforce_pp_raises_the_score(pg_learning_run):
    _, _, start, end = pg_learning_run(
        ReinforcePPAgent, ReinforcePPConfig, prompts_per_update=16, group_size=1
    )
    assert start < 0.6 and end > start + 1.0, (start, end)


@pytest.mark.slow
def test_reinforce_pp_baseline_raises_the_score(pg_learning_run):
    _, _, start, end = pg_learning_run(
        ReinforcePPAgent, ReinforcePPConfig, prompts_per_update=4, group_size=4, group_baseline=True
    )
    assert start < 0.6 and end > start + 1.0, (start, end)
