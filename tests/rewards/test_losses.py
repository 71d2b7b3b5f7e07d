"""Every loss against numbers computed by hand on fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from rewards.losses import (
    LEVELS,
    bradley_terry_loss,
    centering_penalty,
    comparison_loss,
    level_margins,
    llama2_margin_loss,
    normalize_level,
    ranking_loss,
)


def nll(d: float) -> float:
    """-log sigma(d) = log(1 + exp(-d)), written out."""
    return math.log(1.0 + math.exp(-d))


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])
    # differences 1, -2, 0: -log sigma = log(1+e^-1) = 0.313262, log(1+e^2) = 2.126928, log 2 = 0.693147
    expected = (0.313262 + 2.126928 + 0.693147) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(
        (nll(1) + nll(-2) + nll(0)) / 3, rel=1e-6
    )


def test_bradley_terry_gradient_by_hand():
    chosen = torch.tensor([1.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 2.0])
    bradley_terry_loss(chosen, rejected).backward()
    # d/dr_c of -log sigma(d) / n = -(1 - sigma(d)) / n = -sigma(-d) / 2
    expected = [-1 / (1 + math.exp(1)) / 2, -1 / (1 + math.exp(-2)) / 2]
    torch.testing.assert_close(chosen.grad, torch.tensor(expected))


def test_bradley_terry_is_stable_for_huge_gaps():
    loss = bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(1000.0)  # log(1 + e^1000) = 1000 + log(1 + e^-1000)


def test_margin_tables_of_llama2():
    torch.testing.assert_close(level_margins(LEVELS, "small"), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(level_margins(LEVELS, "large"), torch.tensor([3.0, 2.0, 1.0, 0.0]))
    aliases = ["unsure", "Significantly Better", "slightly-better"]
    assert level_margins(aliases, "large").tolist() == [0.0, 3.0, 1.0]
    custom = {"significantly_better": 5, "better": 4, "slightly_better": 3, "negligibly_better": 2}
    assert level_margins(["better"], custom).tolist() == [4.0]
    with pytest.raises(ValueError, match="no margin for levels"):
        level_margins(["better"], {"better": 1.0})
    with pytest.raises(ValueError, match="unknown margin table"):
        level_margins(["better"], "medium")


def test_llama2_margin_loss_small_table_by_hand():
    chosen, rejected = torch.full((4,), 2.0), torch.zeros(4)
    # r_c - r_r - m = 2 - 1, 2 - 2/3, 2 - 1/3, 2 - 0
    expected = (nll(1.0) + nll(4 / 3) + nll(5 / 3) + nll(2.0)) / 4
    assert llama2_margin_loss(chosen, rejected, list(LEVELS), "small").item() == pytest.approx(
        expected, rel=1e-6
    )


def test_llama2_margin_loss_large_table_by_hand():
    chosen, rejected = torch.full((4,), 2.0), torch.zeros(4)
    # r_c - r_r - m = 2 - 3, 2 - 2, 2 - 1, 2 - 0 = -1, 0, 1, 2
    expected = (1.313262 + 0.693147 + 0.313262 + 0.126928) / 4
    assert llama2_margin_loss(chosen, rejected, list(LEVELS), "large").item() == pytest.approx(
        expected, abs=1e-6
    )


def test_llama2_margin_loss_with_numeric_margins():
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0])
    # 1 - 0 - 0.5 = 0.5 and 3 - 1 - 1.5 = 0.5
    expected = nll(0.5)
    assert llama2_margin_loss(chosen, rejected, [0.5, 1.5]).item() == pytest.approx(expected, rel=1e-6)
    assert llama2_margin_loss(chosen, rejected, torch.tensor([0.5, 1.5])).item() == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(ValueError, match="margins"):
        llama2_margin_loss(chosen, rejected, [0.5])


def test_ranking_loss_averages_the_pairs_of_one_prompt():
    scores = torch.tensor([[3.0, 1.0, 0.0]])  # best first
    # pairs (0,1): 3-1=2, (0,2): 3-0=3, (1,2): 1-0=1; loss = mean over the K choose 2 = 3 pairs
    expected = (nll(2) + nll(3) + nll(1)) / 3
    assert ranking_loss(scores).item() == pytest.approx(expected, rel=1e-6)


def test_ranking_loss_weights_prompts_equally_with_padding():
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.5, 1.0, 99.0]])  # row 2 has 2 real responses, 99 is padding
    row1 = (nll(2) + nll(3) + nll(1)) / 3
    row2 = nll(0.5 - 1.0)  # its only pair, ranked 0.5 above 1.0, is violated
    assert ranking_loss(scores, [3, 2]).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    # not the pooled mean over the 4 pairs, which would let long rankings dominate
    assert ranking_loss(scores, [3, 2]).item() != pytest.approx((3 * row1 + row2) / 4, rel=1e-3)
    with pytest.raises(ValueError, match="num_responses"):
        ranking_loss(scores, [3, 1])


def test_centering_penalty_by_hand():
    chosen, rejected = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5])
    # 0.1 * mean((1 + 2)^2, (-1 + 0.5)^2) = 0.1 * (9 + 0.25) / 2
    assert centering_penalty(chosen, rejected, 0.1).item() == pytest.approx(0.4625)


def test_comparison_loss_of_pairs_is_bradley_terry_plus_centering():
    chosen, rejected = torch.tensor([1.0, -1.0, 0.2]), torch.tensor([2.0, 0.5, 0.1])
    margin = torch.tensor([0.0, 1.0, 0.5])
    group = torch.arange(3)
    expected = bradley_terry_loss(chosen, rejected, margin) + centering_penalty(chosen, rejected, 0.01)
    torch.testing.assert_close(comparison_loss(chosen, rejected, group, margin, center_coef=0.01), expected)
    with pytest.raises(ValueError, match="at least one pair"):
        comparison_loss(chosen, rejected, torch.tensor([0, 0, 2]))


def test_normalize_level():
    assert normalize_level("Significantly Better") == "significantly_better"
    assert normalize_level("unsure") == "negligibly_better"
    assert normalize_level("negligibly better/unsure") == "negligibly_better"
    with pytest.raises(ValueError, match="unknown preference level 'much better'"):
        normalize_level("much better")
