"""RLOO: the leave-one-out baseline and the sequence-level REINFORCE loss by hand; it learns the tiny task."""

import pytest
import torch

from agents.rloo import RLOOAgent, RLOOConfig, rloo_advantages, rloo_loss


def test_leave_one_out_baseline():
    rewards = torch.tensor([0.0, 2.0, 4.0, 1.0, 1.0, 4.0])
    # group 1: baselines (2 + 4) / 2 = 3, (0 + 4) / 2 = 2, (0 + 2) / 2 = 1; group 2: 2.5, 2.5, 1
    expected = [0 - 3, 2 - 2, 4 - 1, 1 - 2.5, 1 - 2.5, 4 - 1]
    torch.testing.assert_close(rloo_advantages(rewards, 3), torch.tensor(expected))
    # = k / (k - 1) * (R - mean)
    torch.testing.assert_close(rloo_advantages(rewards, 3)[:3], 1.5 * (rewards[:3] - 2.0))


def test_groups_of_one_raise_instead_of_giving_nan():
    # k = 2: each baseline is the other reward, [1, 3] -> [1 - 3, 3 - 1]
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 3.0]), 2), torch.tensor([-2.0, 2.0]))
    # k = 1: no other reward to average, the leave-one-out mean would be 0 / 0
    with pytest.raises(ValueError, match=r"RLOO.*group_size must be >= 2, got 1"):
        rloo_advantages(torch.tensor([1.0, 3.0]), 1)


def test_loss_is_reinforce_on_the_sequence_log_probability():
    old = torch.zeros(2, 3)
    advantages = torch.tensor([[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logprobs = old.clone().requires_grad_(True)
    loss, _ = rloo_loss(logprobs, old, advantages, mask)
    assert loss.item() == pytest.approx((-3.0 * 3 + 1.0 * 2) / 2)  # -1/k sum_i A_i sum_t rho_it at rho = 1
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.5, -1.5, -1.5], [0.5, 0.5, 0.0]]  # -A_i / k on each token


def test_rloo_raises_the_score(pg_learning_run):
    _, _, start, end = pg_learning_run(RLOOAgent, RLOOConfig, prompts_per_update=4, group_size=4)
    assert start < 0.6 and end > start + 1.0, (start, end)
