"""The leaderboard's statistics: percentile-bootstrap intervals over evaluation prompts (and seeds).

Every number the leaderboard reports is a mean over held-out prompts of a per-prompt value (the mean over
that prompt's draws of the gold score, the proxy score, the KL to the SFT policy, or the indicator of
beating the SFT policy's answer to the same prompt and draw). The prompt is the unit of resampling: the
draws of one prompt are not independent of each other, the prompts are (they are sampled independently
from the task's generator).

With one seed the interval covers the evaluation-prompt sampling only (which prompts were held out), not
the training randomness: a second training run with another seed may land outside it. With N seeds the
bootstrap is hierarchical (Davison and Hinkley 1997, section 3.8; Field and Welsh 2007): each replicate
resamples N seeds with replacement, then, within each resampled seed, the prompts with replacement, and
averages. Its interval covers both sources of variation, and it is the honest one for a few seeds (it
does not pretend that N seeds times P prompts are N * P independent observations).

Intervals are percentile intervals (Efron and Tibshirani 1993, chapter 13) of ``resamples`` replicates
drawn from a seeded generator. Every row of a leaderboard is resampled with the *same* indices
(:class:`Resampler`), so differences between rows are paired by (seed, prompt): "not significantly
different from the best" means that the 95% interval of the paired difference of means contains 0.

On a verifiable task the per-prompt value can also be :func:`pass_at_k`, the unbiased estimate from ``n``
samples of that prompt of the chance that one of ``k`` samples is correct (Chen et al. 2021); it is resampled
like every other per-prompt value.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Estimate",
    "Resampler",
    "paired_difference",
    "pass_at_k",
    "per_prompt_means",
    "percentile_interval",
]

LEVEL = 0.95
"""Confidence level of every interval of the leaderboard."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate (the mean over seeds and prompts) and its percentile-bootstrap interval."""

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the closed interval (False when the interval is undefined)."""
        return bool(self.low <= value <= self.high)

    @property
    def half_width(self) -> float:
        """Half the interval's width, the ``±`` of ``mean ± half_width`` for a symmetric interval."""
        return (self.high - self.low) / 2


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of bootstrap ``replicates`` (NaN if any is
    NaN: a statistic undefined on some resample has no interval)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    replicates = np.asarray(replicates, dtype=np.float64)
    if replicates.ndim != 1 or replicates.size == 0:
        raise ValueError(f"replicates must be a non-empty 1-d array, got shape {replicates.shape}")
    if np.isnan(replicates).any():
        return float("nan"), float("nan")
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def per_prompt_means(values: np.ndarray, prompt_index: np.ndarray, n_prompts: int) -> np.ndarray:
    """Mean of ``values`` over the draws of each prompt ``0 .. n_prompts - 1``, shape ``(n_prompts,)``.

    NaN values (an agent that reported no log-probabilities has no KL) are left out of their prompt's
    mean; a prompt without any finite value, or without any draw, is NaN.
    """
    values = np.asarray(values, dtype=np.float64)
    prompt_index = np.asarray(prompt_index, dtype=np.int64)
    if values.shape != prompt_index.shape or values.ndim != 1:
        raise ValueError(
            f"values {values.shape} and prompt_index {prompt_index.shape} must be equal 1-d shapes"
        )
    if prompt_index.size and (prompt_index.min() < 0 or prompt_index.max() >= n_prompts):
        raise ValueError(
            f"prompt indices must lie in [0, {n_prompts}), got {prompt_index.min()}..{prompt_index.max()}"
        )
    finite = np.isfinite(values)
    sums = np.bincount(prompt_index[finite], weights=values[finite], minlength=n_prompts)
    counts = np.bincount(prompt_index[finite], minlength=n_prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class Resampler:
    """Bootstrap indices shared by every row of a leaderboard: replicate ``b`` takes seeds
    ``seed_index[b]`` (N of them, with replacement) and, within the j-th of them, prompts
    ``prompt_index[b, j]`` (P of them, with replacement). With one seed only the prompts are resampled.

    Build it with :meth:`draw`; :meth:`replicates` and :meth:`estimate` apply it to a ``(N, P)`` array of
    per-prompt values (one row per seed)."""

    seed_index: np.ndarray  # (B, N)
    prompt_index: np.ndarray  # (B, N, P)
    level: float = LEVEL

    @classmethod
    def draw(
        cls, n_seeds: int, n_prompts: int, *, resamples: int, seed: int, level: float = LEVEL
    ) -> Resampler:
        """``resamples`` hierarchical bootstrap replicates for ``n_seeds`` seeds of ``n_prompts`` prompts,
        from ``numpy.random.default_rng(seed)``."""
        if n_seeds < 1 or n_prompts < 1:
            raise ValueError(
                f"need at least one seed and one prompt, got {n_seeds} seeds, {n_prompts} prompts"
            )
        if resamples < 2:
            raise ValueError(f"resamples must be >= 2, got {resamples}")
        rng = np.random.default_rng(seed)
        seeds = (
            rng.integers(0, n_seeds, size=(resamples, n_seeds))
            if n_seeds > 1
            else np.zeros((resamples, 1), dtype=np.int64)
        )
        prompts = rng.integers(0, n_prompts, size=(resamples, n_seeds, n_prompts))
        return cls(seeds, prompts, level)

    @property
    def shape(self) -> tuple[int, int]:
        """``(seeds, prompts)``: the shape of the arrays it resamples."""
        return self.prompt_index.shape[1], self.prompt_index.shape[2]

    def _check(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            values = values[None]
        if values.shape != self.shape:
            raise ValueError(
                f"expected per-prompt values of shape (seeds, prompts) = {self.shape}, got {values.shape}"
            )
        return values

    def replicates(self, values: np.ndarray) -> np.ndarray:
        """The grand mean of every bootstrap replicate of ``values`` (``(N, P)``, or ``(P,)`` for one seed),
        shape ``(B,)``. A NaN anywhere in the resampled cells makes that replicate NaN."""
        values = self._check(values)
        rows = values[self.seed_index]  # (B, N, P): the resampled seeds' rows
        picked = np.take_along_axis(rows, self.prompt_index, axis=2)  # (B, N, P)
        return picked.mean(axis=(1, 2))

    def estimate(self, values: np.ndarray) -> Estimate:
        """The grand mean of ``values`` and its percentile interval (NaN-free values; with NaNs, the point
        estimate leaves them out and the interval is NaN)."""
        values = self._check(values)
        finite = np.isfinite(values)
        if not finite.any():
            return Estimate(float("nan"), float("nan"), float("nan"))
        mean = float(values[finite].mean())
        if not finite.all():
            return Estimate(mean, float("nan"), float("nan"))
        low, high = percentile_interval(self.replicates(values), self.level)
        return Estimate(mean, low, high)


def paired_difference(a: np.ndarray, b: np.ndarray, resampler: Resampler) -> Estimate:
    """Mean of ``a - b`` (per-prompt values of two rows on the same seeds and prompts) and its paired
    percentile-bootstrap interval: both rows are resampled with the same indices. ``b`` is "significantly
    better" than ``a`` when the interval lies below 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same shape, got {a.shape} and {b.shape}")
    return resampler.estimate(a - b)


def _counts(name: str, values: np.ndarray | int) -> np.ndarray:
    """``values`` as an int64 array, refusing negative or fractional counts."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu" and not (
        array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array))
    ):
        raise ValueError(f"{name} must be whole numbers of samples, got {values!r}")
    array = array.astype(np.int64)
    if np.any(array < 0):
        raise ValueError(f"{name} must be >= 0, got {values!r}")
    return array


def pass_at_k(n: np.ndarray | int, c: np.ndarray | int, k: int) -> np.ndarray | float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct, per prompt.

    pass@k is the chance that at least one of ``k`` samples of a prompt is correct. Sampling exactly ``k``
    per prompt estimates it with a high variance, and ``1 - (1 - c/n)^k`` from ``n > k`` samples is biased
    low (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", section 2.1); the unbiased
    estimator counts the ``k``-subsets of the ``n`` samples without a correct one::

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    computed as the product (the binomial coefficients overflow a float for a few hundred samples), and
    exactly 1 when ``n - c < k`` (every ``k``-subset holds a correct sample). ``pass@1 = c / n``.

    Args:
        n: samples of each prompt (an int or an array of them).
        c: correct samples of each prompt, broadcast against ``n``.
        k: the number of tries, ``1 <= k <= n``.

    Returns:
        The estimate for every prompt, shape ``broadcast(n, c)`` (a float for scalar ``n`` and ``c``).

    Raises:
        ValueError: when ``k < 1``, ``k > n`` (fewer samples than tries estimate nothing), ``c > n``, or a
            count is negative or fractional.
    """
    k = operator.index(k)
    n, c = np.broadcast_arrays(_counts("n", n), _counts("c", c))
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if np.any(k > n):
        raise ValueError(f"pass@{k} needs at least k={k} samples per prompt, got n={n.min()}")
    if np.any(c > n):
        raise ValueError(f"more correct samples than samples: c={c.max()} > n={n[c > n].min()}")
    i = np.arange(1, int(n.max()) + 1 if n.size else 1)  # (I,)
    inside = (i > (n - c)[..., None]) & (i <= n[..., None])  # (..., I): the factors of the product
    factors = np.where(inside, 1.0 - k / i, 1.0)  # every factor is > 0 where n - c >= k
    value = np.where(n - c < k, 1.0, 1.0 - factors.prod(axis=-1))
    return float(value) if value.ndim == 0 else value
