"""The leaderboard's statistics against hand-computable cases: degenerate samples, two-point samples whose
bootstrap distribution is known exactly, pairing, NaN handling, the coverage of a known mean, and the
unbiased pass@k estimator against exact binomial coefficients."""

import math
from fractions import Fraction

import numpy as np
import pytest

from rlhf_bench.leaderboard.stats import (
    Estimate,
    Resampler,
    paired_difference,
    pass_at_k,
    per_prompt_means,
    percentile_interval,
)


def test_a_constant_sample_has_a_zero_width_interval():
    resampler = Resampler.draw(1, 20, resamples=500, seed=0)
    assert resampler.estimate(np.full(20, 1.25)) == Estimate(1.25, 1.25, 1.25)
    resampler = Resampler.draw(3, 20, resamples=500, seed=0)  # across seeds too
    assert resampler.estimate(np.full((3, 20), -2.0)) == Estimate(-2.0, -2.0, -2.0)


def test_two_prompts_resample_to_their_exact_bootstrap_distribution():
    # Two prompts scoring 0 and 1: a replicate's mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1 and the replicates average 1/2.
    resampler = Resampler.draw(1, 2, resamples=20_000, seed=1)
    replicates = resampler.replicates(np.array([0.0, 1.0]))
    assert set(np.unique(replicates)) == {0.0, 0.5, 1.0}
    assert np.mean(replicates == 0.5) == pytest.approx(0.5, abs=0.02)
    assert resampler.estimate(np.array([0.0, 1.0])) == Estimate(0.5, 0.0, 1.0)


def test_the_hierarchical_bootstrap_resamples_seeds_then_prompts():
    # Constant within each seed, different across seeds: resampling prompts alone would give a
    # zero-width interval; resampling the two seeds gives means 0, 1/2, 1 as above.
    values = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    resampler = Resampler.draw(2, 3, resamples=20_000, seed=2)
    assert resampler.estimate(values) == Estimate(0.5, 0.0, 1.0)
    within = Resampler.draw(1, 3, resamples=2_000, seed=2)
    assert within.estimate(values[1]) == Estimate(1.0, 1.0, 1.0)
    # Every replicate draws N seeds, and within each of them P prompts of that seed's row.
    assert resampler.seed_index.shape == (20_000, 2) and resampler.prompt_index.shape == (20_000, 2, 3)
    one = Resampler(np.array([[1, 1]]), np.array([[[0, 0, 2], [1, 2, 2]]]))
    assert one.replicates(np.array([[0.0, 1.0, 2.0], [10.0, 20.0, 30.0]])) == pytest.approx(
        [(10 + 10 + 30 + 20 + 30 + 30) / 6]
    )


def test_the_bootstrap_is_seeded():
    values = np.random.default_rng(0).normal(size=(2, 30))
    a = Resampler.draw(2, 30, resamples=300, seed=7).estimate(values)
    assert a == Resampler.draw(2, 30, resamples=300, seed=7).estimate(values)
    assert a != Resampler.draw(2, 30, resamples=300, seed=8).estimate(values)
    assert a.mean == pytest.approx(values.mean())


def test_intervals_of_a_normal_mean_cover_it_about_95_percent_of_the_time():
    """200 samples of 60 draws from N(3, 2^2), each with its own 1000-replicate interval: the percentile
    bootstrap of a mean covers the true mean close to the nominal 95% (a little less at small n). Seeded,
    so not flaky; the bounds are 4 standard errors of a 200-trial coverage wide."""
    rng = np.random.default_rng(12345)
    covered, widths = 0, []
    for trial in range(200):
        sample = rng.normal(3.0, 2.0, size=60)
        estimate = Resampler.draw(1, 60, resamples=1000, seed=trial).estimate(sample)
        covered += estimate.contains(3.0)
        widths.append(estimate.high - estimate.low)
    assert 0.88 <= covered / 200 <= 0.99, covered
    # The width matches the normal theory 2 * 1.96 * sigma / sqrt(n) = 1.012 on average.
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(60), rel=0.08)


def test_paired_differences_cancel_what_two_rows_share():
    rng = np.random.default_rng(3)
    prompt_difficulty = rng.normal(0, 5, size=40)  # large, shared by both rows
    a, b = prompt_difficulty + 0.3, prompt_difficulty
    resampler = Resampler.draw(1, 40, resamples=2000, seed=0)
    difference = paired_difference(a, b, resampler)
    assert difference.mean == pytest.approx(0.3) and difference.low == pytest.approx(0.3)
    assert difference.high == pytest.approx(0.3)
    # Each row alone has an interval far wider than the difference (what an unpaired test would see).
    assert resampler.estimate(a).half_width > 1.0
    with pytest.raises(ValueError, match="same shape"):
        paired_difference(a, b[:-1], resampler)


def test_per_prompt_means_average_draws_and_skip_nans():
    values = np.array([1.0, 3.0, 5.0, np.nan, np.nan, 2.0])
    index = np.array([0, 0, 1, 1, 2, 3])
    means = per_prompt_means(values, index, 5)
    np.testing.assert_array_equal(means, [2.0, 5.0, np.nan, 2.0, np.nan])
    with pytest.raises(ValueError, match="prompt indices"):
        per_prompt_means(values, index, 3)


def test_nan_values_give_an_undefined_interval_and_bad_input_raises():
    resampler = Resampler.draw(1, 3, resamples=100, seed=0)
    estimate = resampler.estimate(np.array([1.0, np.nan, 3.0]))
    assert estimate.mean == 2.0 and np.isnan(estimate.low) and np.isnan(estimate.high)
    assert np.isnan(resampler.estimate(np.full(3, np.nan)).mean)
    with pytest.raises(ValueError, match=r"shape \(seeds, prompts\) = \(1, 3\)"):
        resampler.estimate(np.zeros(4))
    with pytest.raises(ValueError, match="resamples"):
        Resampler.draw(1, 3, resamples=1, seed=0)
    with pytest.raises(ValueError, match="at least one seed"):
        Resampler.draw(0, 3, resamples=10, seed=0)
    with pytest.raises(ValueError, match="level"):
        percentile_interval(np.zeros(3), level=1.5)
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


# ------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_by_hand():
    # n=4 samples, c=1 correct, k=2: 3 of the C(4, 2) = 6 pairs of samples hold the correct one.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # The plug-in 1 - (1 - c/n)^k says 0.4375: it draws the k samples with replacement, biased low.
    assert pass_at_k(4, 1, 2) > 1 - (1 - 1 / 4) ** 2
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 0, 4) == 0.0  # nothing correct, at any k
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the share of correct samples
    assert pass_at_k(5, 1, 3) == pytest.approx(1 - 4 / 10)  # 1 - C(4, 3) / C(5, 3)
    assert pass_at_k(16, 1, 16) == 1.0  # k = n: whether any sample is correct
    assert isinstance(pass_at_k(4, 1, 2), float)


def test_pass_at_k_matches_the_binomial_coefficients_and_is_vectorised_over_prompts():
    n = np.array([n for n in range(1, 13) for c in range(n + 1)])
    c = np.array([c for n in range(1, 13) for c in range(n + 1)])
    for k in range(1, 13):
        keep = n >= k
        exact = [1 - math.comb(int(a - b), k) / math.comb(int(a), k) for a, b in zip(n[keep], c[keep])]
        np.testing.assert_allclose(pass_at_k(n[keep], c[keep], k), exact, rtol=0, atol=1e-12)
    # Monotone in k for every prompt, from c/n at k=1 to 1 (any correct) or 0 (none) at k=n.
    curve = np.stack([pass_at_k(16, np.arange(17), k) for k in (1, 2, 4, 8, 16)])  # (K, P)
    assert np.all(np.diff(curve, axis=0) >= 0)
    np.testing.assert_allclose(curve[0], np.arange(17) / 16)
    np.testing.assert_array_equal(curve[-1], np.arange(17) > 0)
    assert pass_at_k(16, np.array([[0, 4], [8, 16]]), 4).shape == (2, 2)


def test_pass_at_k_is_stable_where_the_binomial_coefficients_overflow_a_float():
    # C(2000, 1000) is about 2e600: the ratio of floats is inf / inf; the product form stays exact.
    with pytest.raises(OverflowError):
        float(math.comb(2000, 1000))
    exact = 1 - Fraction(math.comb(1997, 1000), math.comb(2000, 1000))
    assert pass_at_k(2000, 3, 1000) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, rel=1e-12)  # 1 - C(999, 500) / C(1000, 500)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (4, 1, 5, r"pass@5 needs at least k=5 samples per prompt, got n=4"),
        (np.array([8, 4]), np.array([1, 1]), 8, r"at least k=8 samples per prompt, got n=4"),
        (4, 5, 2, r"more correct samples than samples: c=5 > n=4"),
        (4, 1, 0, r"k >= 1"),
        (4, -1, 1, r"c must be >= 0"),
        (4, 1.5, 1, r"c must be whole numbers"),
    ],
)
def test_pass_at_k_refuses_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)
