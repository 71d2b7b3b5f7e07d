"""GSPO: the length-normalised sequence ratio and sequence-level clipping by hand; it learns the tiny task."""

import math

import pytest
import torch

from agents.grpo import grpo_loss
from agents.gspo import GSPOAgent, GSPOConfig, gspo_loss, sequence_ratio

MASK = torch.tensor([[True, True], [True, False]])


def test_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[math.log(4.0), 0.0], [math.log(0.25), 7.0]])  # 7.0 is padding
    torch.testing.assert_close(sequence_ratio(logprobs, old, MASK), torch.tensor([2.0, 0.25]))


def test_loss_clips_whole_sequences():
    old = torch.zeros(2, 2)
    logprobs = torch.tensor([[math.log(4.0), 0.0], [math.log(0.25), 0.0]])
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # s = (2, 0.25); clip 0.2: -min(2, 1.2) = -1.2 and -min(-0.25, -0.8) = 0.8
    loss, stats = gspo_loss(logprobs, old, advantages, MASK, clip_range=0.2, clip_range_high=0.2)
    assert float(loss) == pytest.approx((-1.2 + 0.8) / 2)
    assert float(stats["clipfrac"]) == 1.0 and float(stats["ratio"]) == pytest.approx(1.125)
    # the paper's clip range (3e-4, 4e-4): 1 + 4e-4 and 1 - 3e-4
    loss, _ = gspo_loss(logprobs, old, advantages, MASK)
    assert float(loss) == pytest.approx((-1.0004 + 0.9997) / 2, abs=1e-7)
    # a token-level loss sees ratios 4 and 1 instead: another value
    token, _ = grpo_loss(logprobs, old, advantages, MASK, clip_range=0.2)
    assert float(token) == pytest.approx(((-1.2 - 1.0) / 2 + 0.8) / 2)


def test_gradient_at_ratio_one_equals_grpos():
    """At s = 1: grad s_i = 1/|y_i| sum_t grad log pi, so GSPO's gradient is GRPO's."""
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    advantages = torch.tensor([[0.7, 0.7], [-1.3, -1.3]])
    grads = []
    for loss_fn in (gspo_loss, grpo_loss):
        logprobs = old.clone().requires_grad_(True)
        loss_fn(logprobs, old, advantages, MASK)[0].backward()
        grads.append(logprobs.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(grads[0], torch.tensor([[-0.7 / 4, -0.7 / 4], [1.3 / 2, 0.0]]))


@pytest.mark.slow
def test_gspo_raises_the_score(pg_learning_run):
    _, _, start, end = pg_learning_run(
        GSPOAgent, GSPOConfig, prompts_per_update=4, group_size=4, clip_range=0.2, clip_range_high=0.2
    )
    assert start < 0.6 and end > start + 1.0, (start, end)
