"""Simulated annotators: Bradley-Terry pairs, gold-gap levels, Plackett-Luce rankings, all seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewards.annotators import (
    bradley_terry_winners,
    gap_levels,
    plackett_luce_orders,
    simulate_preferences,
    simulate_rankings,
)
from rewards.data import load_preferences, save_preferences


def length_gold(prompts, responses):
    return [float(len(r.split())) for r in responses]


def fixed_policy(rows):
    """A policy that returns the given responses for every prompt."""
    return lambda prompts, k: [list(rows[:k]) for _ in prompts]


def test_bradley_terry_win_rate_is_sigma_of_the_scaled_gap():
    rng = np.random.default_rng(0)
    n = 40_000
    for gap, temperature in ((1.0, 1.0), (1.0, 0.5), (-2.0, 2.0)):
        wins = bradley_terry_winners(np.full(n, gap), np.zeros(n), temperature, rng)
        expected = 1 / (1 + math.exp(-gap / temperature))  # 0.731, 0.881, 0.269
        assert wins.mean() == pytest.approx(expected, abs=0.01)


def test_noiseless_annotator_and_ties():
    rng = np.random.default_rng(0)
    wins = bradley_terry_winners(np.array([2.0, 0.0, 1.0]), np.array([1.0, 3.0, 1.0]), 0.0, rng)
    assert wins[:2].tolist() == [True, False]
    ties = bradley_terry_winners(np.ones(10_000), np.ones(10_000), 0.0, rng)
    assert ties.mean() == pytest.approx(0.5, abs=0.02)  # a fair coin


def test_levels_from_the_gold_gap():
    assert gap_levels([3.0, -3.5, -2.5, 2.0, 1.0, 0.99, 0.0]) == [
        "significantly_better", "significantly_better", "better", "better", "slightly_better",
        "negligibly_better", "negligibly_better",
    ]  # fmt: skip
    assert gap_levels([0.6, 0.3, 0.1], thresholds=(0.5, 0.25, 0.125)) == [
        "significantly_better", "better", "negligibly_better",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="three decreasing"):
        gap_levels([1.0], thresholds=(1.0, 2.0, 3.0))


def test_simulated_pairs_are_seeded_and_labelled_from_the_gold_scores():
    words = ["w"] * 8
    policy = fixed_policy([" " + " ".join(words[:n]) for n in (5, 1, 2, 4)])  # lengths 5,1 then 2,4
    prompts = ["p0", "p1", "p2"]
    pairs = simulate_preferences(prompts, policy, length_gold, pairs_per_prompt=2, temperature=0.0, seed=0)
    assert len(pairs) == 6
    for c in pairs:
        assert c.gold[0] > c.gold[1]  # noiseless: the longer response wins
        assert c.level == gap_levels([c.gold[0] - c.gold[1]])[0]
    assert [c.level for c in pairs[:2]] == ["significantly_better", "better"]  # gaps 4 and 2
    noisy = dict(pairs_per_prompt=2, temperature=2.0)
    first = simulate_preferences(prompts * 50, policy, length_gold, seed=7, **noisy)
    assert first == simulate_preferences(prompts * 50, policy, length_gold, seed=7, **noisy)
    assert first != simulate_preferences(prompts * 50, policy, length_gold, seed=8, **noisy)
    # the winner rate of the gap-4 pair is sigma(4 / 2) = 0.881 (150 draws)
    rate = np.mean([c.gold[0] == 5.0 for c in first[0::2]])
    assert rate == pytest.approx(1 / (1 + math.exp(-2.0)), abs=0.08)


def test_identical_samples_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="dropped 1 simulated pairs"):
        pairs = simulate_preferences(
            ["p"], fixed_policy([" a", " a", " a", " b c"]), length_gold, pairs_per_prompt=2
        )
    assert len(pairs) == 1 and set(pairs[0].responses) == {" a", " b c"}


def test_empty_samples_are_dropped_with_a_warning():
    """A policy may emit EOS at once; an empty response cannot be a labelled comparison."""
    with pytest.warns(UserWarning, match="dropped 1 simulated pairs"):
        pairs = simulate_preferences(
            ["p"], fixed_policy(["", " a", " b", " c d"]), length_gold, pairs_per_prompt=2
        )
    assert len(pairs) == 1 and set(pairs[0].responses) == {" b", " c d"}
    with pytest.warns(UserWarning, match="fewer than two distinct non-empty"):
        assert simulate_rankings(["p"], fixed_policy(["", " ", " a"]), length_gold, k=3) == []


def test_bad_sampling_policy_and_arguments():
    with pytest.raises(ValueError, match="must return 2 strings per prompt; prompt 0"):
        simulate_preferences(["p"], lambda prompts, k: [[" a"]], length_gold)
    with pytest.raises(ValueError, match="responses for 2 prompts, expected 1"):
        simulate_preferences(["p"], lambda prompts, k: [[" a", " b"]] * 2, length_gold)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        simulate_preferences(["p"], fixed_policy([" a", " b"]), length_gold, temperature=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        simulate_preferences(["p"], fixed_policy([" a", " b"]), lambda p, r: [float("nan")] * len(r))


def test_plackett_luce_first_place_frequencies_are_the_softmax():
    rng = np.random.default_rng(0)
    gold = np.tile(np.array([1.0, 0.0, -1.0]), (30_000, 1))
    orders = plackett_luce_orders(gold, temperature=1.0, rng=rng)
    softmax = np.exp([1.0, 0.0, -1.0]) / np.exp([1.0, 0.0, -1.0]).sum()  # 0.665, 0.245, 0.090
    np.testing.assert_allclose(np.bincount(orders[:, 0], minlength=3) / len(orders), softmax, atol=0.01)
    # second place given that 0 won: softmax over the rest, sigma(1) = 0.731 for response 1
    second = orders[orders[:, 0] == 0, 1]
    assert np.mean(second == 1) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.015)
    assert plackett_luce_orders(np.array([[0.0, 2.0, 1.0]]), 0.0, rng).tolist() == [[1, 2, 0]]


def test_simulated_rankings_round_trip_through_jsonl(tmp_path):
    policy = fixed_policy([" a b", " a", " a b c d", " a b c"])
    ranks = simulate_rankings(["p", "q"], policy, length_gold, k=4, temperature=0.0, seed=0)
    assert [c.responses for c in ranks] == [(" a b c d", " a b c", " a b", " a")] * 2
    assert ranks[0].gold == (4.0, 3.0, 2.0, 1.0)
    save_preferences(ranks, tmp_path / "ranks.jsonl")
    assert [c.responses for c in load_preferences(tmp_path / "ranks.jsonl")] == [c.responses for c in ranks]
    with pytest.warns(UserWarning, match="dropped 1 prompts"):
        assert simulate_rankings(["p"], fixed_policy([" a", " a"]), length_gold, k=2) == []
    deduped = simulate_rankings(["p"], fixed_policy([" a", " a b", " a"]), length_gold, k=3, temperature=0)
    assert deduped[0].responses == (" a b", " a")
