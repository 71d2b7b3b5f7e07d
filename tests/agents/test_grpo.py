"""GRPO: group mean/std advantages and the per-response-then-per-group loss by hand; it learns the tiny task."""

import math

import pytest
import torch

from agents.dapo import dapo_advantages
from agents.dr_grpo import dr_grpo_advantages
from agents.grpo import GRPOAgent, GRPOConfig, grpo_advantages, grpo_loss
from agents.gspo import gspo_advantages
from llm_env.kl import KLGradientBiasWarning


def test_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([0.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, std (Bessel) sqrt((4 + 0 + 4) / 2) = 2; group 2: all equal -> 0
    expected = torch.tensor([-2.0, 0.0, 2.0]) / (2.0 + 1e-4)
    torch.testing.assert_close(grpo_advantages(rewards, 3)[:3], expected)
    assert grpo_advantages(rewards, 3)[3:].tolist() == [0.0, 0.0, 0.0]
    # [1, 3]: mean 2, std sqrt(2)
    torch.testing.assert_close(
        grpo_advantages(torch.tensor([1.0, 3.0]), 2, eps=0.0),
        torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)]),
    )
    with pytest.raises(ValueError, match="whole groups"):
        grpo_advantages(rewards, 4)


NORMALISED = [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0]


@pytest.mark.parametrize(
    ("advantages", "expected"),
    [
        (grpo_advantages, NORMALISED),
        (dapo_advantages, NORMALISED),  # DAPO and GSPO use GRPO's advantage
        (gspo_advantages, NORMALISED),
        (dr_grpo_advantages, [-1.0, 1.0, 0.0, 0.0]),  # R_i - mean, not scaled
    ],
)
def test_groups_of_one_raise_instead_of_giving_nan(advantages, expected):
    # [1, 3]: mean 2, Bessel std sqrt(2); [5, 5]: all equal -> 0
    torch.testing.assert_close(advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), 2), torch.tensor(expected))
    # A group of one: Bessel's std divides by n - 1 = 0 (NaN), and R_i - mean is 0 (no signal).
    with pytest.raises(ValueError, match=r"group_size must be >= 2, got 1 .*2 responses per prompt"):
        advantages(torch.tensor([1.0, 3.0]), 1)


def test_loss_averages_each_response_then_the_group():
    # response 1: 2 tokens, ratios 1.5 and 1.0, A = +1; response 2: 1 token, ratio 0.5, A = -1
    old = torch.zeros(2, 2)
    logprobs = torch.log(torch.tensor([[1.5, 1.0], [0.5, 1.0]]))
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = grpo_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # per token: -min(1.5, 1.2) = -1.2, -1.0; -min(-0.5, -0.8) = 0.8 -> (-2.2 / 2 + 0.8 / 1) / 2
    assert float(loss) == pytest.approx((-2.2 / 2 + 0.8) / 2)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)


def test_grpo_raises_the_score(pg_learning_run):
    _, history, start, end = pg_learning_run(GRPOAgent, GRPOConfig, prompts_per_update=4, group_size=4)
    assert start < 0.6 and end > start + 1.0, (start, end)  # fails if learning is broken
    assert {"policy_loss", "clipfrac", "approx_kl", "entropy", "advantage_std", "sampled_tokens"} <= set(
        history[0]
    )


@pytest.mark.slow
def test_grpo_with_the_kl_in_the_loss_raises_the_score(pg_learning_run):
    with pytest.warns(
        KLGradientBiasWarning, match="KL\\(pi_ref \\|\\| pi\\)"
    ):  # DeepSeekMath's k3 in the loss
        _, history, start, end = pg_learning_run(
            GRPOAgent, GRPOConfig, prompts_per_update=4, group_size=4, kl_in="loss", kl_estimator="k3"
        )
    assert start < 0.6 and end > start + 1.0, (start, end)
    assert history[-1]["kl_loss"] > 0  # the KL term is in the loss...
    assert history[-1]["kl_coef"] == 0.01  # ...with the configured beta
