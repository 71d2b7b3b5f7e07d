"""Dr. GRPO: no std division, no per-response length normalisation (by hand); it learns the tiny task."""

import pytest
import torch

from agents.dr_grpo import DrGRPOAgent, DrGRPOConfig, dr_grpo_advantages, dr_grpo_loss
from agents.grpo import grpo_loss


def test_advantages_are_centred_not_scaled():
    rewards = torch.tensor([0.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    assert dr_grpo_advantages(rewards, 3).tolist() == [-2.0, 0.0, 2.0, 0.0, 0.0, 0.0]


def test_loss_divides_by_a_constant_length():
    # response 1: 3 tokens, response 2: 1 token, all ratios 1, A = +1 and -1
    old = torch.zeros(2, 3)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    loss, _ = dr_grpo_loss(old.clone(), old, advantages, mask, max_length=4)
    assert float(loss) == pytest.approx((-3.0 + 1.0) / (2 * 4))
    # GRPO divides each response by its length instead: the short response weighs three times more per token
    grpo, _ = grpo_loss(old.clone(), old, advantages, mask)
    assert float(grpo) == pytest.approx((-3.0 / 3 + 1.0 / 1) / 2)
    # the gradient of every token is the same in Dr. GRPO, whatever the length of its response
    logprobs = old.clone().requires_grad_(True)
    dr_grpo_loss(logprobs, old, advantages, mask, max_length=4)[0].backward()
    assert logprobs.grad.tolist() == [[-1 / 8] * 3, [1 / 8, 0.0, 0.0]]


@pytest.mark.slow
def test_dr_grpo_raises_the_score(pg_learning_run):
    agent, history, start, end = pg_learning_run(
        DrGRPOAgent, DrGRPOConfig, prompts_per_update=4, group_size=4
    )
    assert start < 0.6 and end > start + 1.0, (start, end)
