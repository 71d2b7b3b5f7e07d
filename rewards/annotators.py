"""Simulated annotators: preference data for any task without humans.

Following Gao, Schulman and Hilton (2022), "Scaling Laws for Reward Model Overoptimization", a fixed
*gold* scoring function stands in for the humans. A sampling policy writes responses, the gold function
scores them, and a simulated annotator labels them:

* pairs: the winner is drawn from the Bradley-Terry model of the gold scores,
  ``P(a preferred to b) = sigma((g_a - g_b) / temperature)``, so labels are noisy the way human labels
  are (InstructGPT's labelers agree with each other 72.6% of the time, Ouyang et al. 2022);
  ``temperature=0`` always prefers the higher gold score. The Llama 2 preference level comes from the
  gold gap ``|g_a - g_b|``;
* K-way rankings: the order is drawn from the Plackett-Luce model, the K-way generalisation of
  Bradley-Terry (pick the best with probability ``softmax(g / temperature)``, then the best of the
  rest, ...), sampled exactly by sorting ``g / temperature + Gumbel noise``.

Every random choice comes from one ``numpy.random.Generator`` seeded by ``seed``; the sampling policy is
the caller's, so seed it too for reproducible data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from llm_env.reward import check_scores
from rewards.data import Comparison
from rewards.losses import LEVELS

__all__ = [
    "bradley_terry_winners",
    "gap_levels",
    "plackett_luce_orders",
    "simulate_preferences",
    "simulate_rankings",
]

SampleFn = Callable[[list[str], int], Sequence[Sequence[str]]]
GoldFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]

DEFAULT_LEVEL_THRESHOLDS = (3.0, 2.0, 1.0)
"""Gold gaps at which a pair becomes significantly better, better, slightly better (below: negligibly).

They mirror Llama 2's "large" margin table (3, 2, 1, 0): with a gold score on the logit scale and
``temperature=1``, the margin of a pair's level is then a lower bound on its true score gap.
"""


def bradley_terry_winners(
    gold_a: np.ndarray, gold_b: np.ndarray, temperature: float, rng: np.random.Generator
) -> np.ndarray:
    """``(n,)`` bool: whether ``a`` wins each pair, drawn with ``P = sigma((g_a - g_b) / temperature)``.

    ``temperature=0`` is the noiseless annotator: the higher gold score wins, ties by a fair coin.
    """
    gap = np.asarray(gold_a, dtype=np.float64) - np.asarray(gold_b, dtype=np.float64)
    u = rng.random(gap.shape)
    if temperature == 0:
        return np.where(gap == 0, u < 0.5, gap > 0)
    p_a = 0.5 * (1.0 + np.tanh(gap / (2.0 * temperature)))  # sigma(gap / T) without overflow
    return u < p_a


def gap_levels(gaps: np.ndarray, thresholds: Sequence[float] = DEFAULT_LEVEL_THRESHOLDS) -> list[str]:
    """Llama 2 level of each absolute gold gap: ``>= t1`` significantly better, ``>= t2`` better, ``>= t3``
    slightly better, else negligibly better."""
    t = _check_thresholds(thresholds)
    gaps = np.abs(np.asarray(gaps, dtype=np.float64)).ravel()
    index = np.select([gaps >= t[0], gaps >= t[1], gaps >= t[2]], [0, 1, 2], default=3)
    return [LEVELS[i] for i in index.tolist()]


def plackett_luce_orders(gold: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, K)`` indices of each row of ``gold`` (n, K) ranked best first, drawn from Plackett-Luce.

    Sorting ``g / T + Gumbel`` in decreasing order samples the Plackett-Luce ranking exactly (the
    Gumbel-max trick applied repeatedly; Yellott 1977). ``temperature=0`` sorts by the gold score with
    ties in random order.
    """
    gold = np.asarray(gold, dtype=np.float64)
    if gold.ndim != 2:
        raise ValueError(f"gold must have shape (n, K), got {gold.shape}")
    if temperature == 0:
        tiebreak = rng.random(gold.shape)
        return np.lexsort((tiebreak, -gold), axis=1)  # the last key is the primary one
    keys = gold / temperature + rng.gumbel(size=gold.shape)
    return np.argsort(-keys, axis=1, kind="stable")


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, float, float]:
    t = tuple(float(x) for x in thresholds)
    if len(t) != 3 or not t[0] >= t[1] >= t[2] >= 0:
        raise ValueError(
            "level_thresholds must be three decreasing non-negative gold gaps (significantly better, better, "
            f"slightly better), got {tuple(thresholds)}"
        )
    return t  # type: ignore[return-value]


def _check_common(temperature: float, seed: int) -> np.random.Generator:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: noiseless annotator), got {temperature}")
    return np.random.default_rng(seed)


def _sample(prompts: list[str], sample_fn: SampleFn, k: int) -> list[list[str]]:
    samples = sample_fn(prompts, k)
    if len(samples) != len(prompts):
        raise ValueError(f"sample_fn returned responses for {len(samples)} prompts, expected {len(prompts)}")
    out = []
    for i, row in enumerate(samples):
        row = list(row)
        if len(row) != k or not all(isinstance(r, str) for r in row):
            raise ValueError(f"sample_fn must return {k} strings per prompt; prompt {i} got {row!r:.200}")
        out.append(row)
    return out


def _gold_scores(prompts: list[str], samples: list[list[str]], gold: GoldFn) -> np.ndarray:
    """Gold scores of all samples, ``(n, k)``, in one batched call."""
    flat_prompts = [p for p, row in zip(prompts, samples) for _ in row]
    flat = [r for row in samples for r in row]
    scores = check_scores(gold(flat_prompts, flat), len(flat), "the gold scoring function")
    return scores.double().cpu().numpy().reshape(len(prompts), -1)


def simulate_preferences(
    prompts: Sequence[str],
    sample_fn: SampleFn,
    gold: GoldFn,
    *,
    pairs_per_prompt: int = 1,
    temperature: float = 1.0,
    level_thresholds: Sequence[float] = DEFAULT_LEVEL_THRESHOLDS,
    seed: int = 0,
) -> list[Comparison]:
    """Preference pairs labelled by a simulated Bradley-Terry annotator.

    For each prompt, ``sample_fn(prompts, 2 * pairs_per_prompt)`` provides responses that are paired
    consecutively; the winner of each pair is drawn from the Bradley-Terry model of the gold scores at
    ``temperature`` and the level is set from the gold gap by ``level_thresholds``. Pairs whose two
    responses are identical, or that contain an empty response (a policy may stop at once), cannot be
    labelled and are dropped, with a warning saying how many.

    Args:
        prompts: the prompts.
        sample_fn: ``(prompts, k) -> k responses per prompt``, the sampling policy.
        gold: ``(prompts, responses) -> gold scores``, batched.
        pairs_per_prompt: pairs per prompt.
        temperature: annotator noise; 0 is noiseless.
        level_thresholds: gold gaps of the significantly better / better / slightly better levels.
        seed: seeds the annotator's choices.

    Returns:
        :class:`Comparison` pairs (chosen first) with ``level`` and the two ``gold`` scores.
    """
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    _check_thresholds(level_thresholds)
    rng = _check_common(temperature, seed)
    prompts = list(prompts)
    samples = _sample(prompts, sample_fn, 2 * pairs_per_prompt)
    scores = _gold_scores(prompts, samples, gold)  # (n, 2m)
    a, b = scores[:, 0::2], scores[:, 1::2]  # (n, m) each
    a_wins = bradley_terry_winners(a, b, temperature, rng)  # (n, m)
    levels = np.array(gap_levels(a - b, level_thresholds)).reshape(a.shape)
    out, dropped = [], 0
    for i, prompt in enumerate(prompts):
        for j in range(pairs_per_prompt):
            ra, rb = samples[i][2 * j], samples[i][2 * j + 1]
            if ra == rb or not ra.strip() or not rb.strip():
                dropped += 1  # identical or empty responses cannot be labelled
                continue
            first, second = (0, 1) if a_wins[i, j] else (1, 0)
            texts, golds = (ra, rb), (float(a[i, j]), float(b[i, j]))
            out.append(
                Comparison(
                    prompt,
                    (texts[first], texts[second]),
                    level=str(levels[i, j]),
                    where=f"simulated prompt {i} pair {j}",
                    gold=(golds[first], golds[second]),
                )
            )
    if dropped:
        warnings.warn(
            f"dropped {dropped} simulated pairs whose responses were identical or empty", stacklevel=2
        )
    return out


def simulate_rankings(
    prompts: Sequence[str],
    sample_fn: SampleFn,
    gold: GoldFn,
    *,
    k: int = 4,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Comparison]:
    """K-way rankings (InstructGPT collects K = 4 to 9) drawn from the Plackett-Luce model of gold scores.

    Duplicate responses of a prompt are kept once (a ranking must compare distinct texts) and empty ones
    are left out; prompts left with fewer than two are dropped, with a warning saying how many.

    Returns:
        :class:`Comparison` rankings with responses best first and their ``gold`` scores.
    """
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 responses, got {k}")
    rng = _check_common(temperature, seed)
    prompts = list(prompts)
    samples = _sample(prompts, sample_fn, k)
    scores = _gold_scores(prompts, samples, gold)  # (n, k)
    orders = plackett_luce_orders(scores, temperature, rng)  # (n, k)
    out, dropped = [], 0
    for i, prompt in enumerate(prompts):
        ranked = list(dict.fromkeys(samples[i][o] for o in orders[i] if samples[i][o].strip()))  # best copy
        if len(ranked) < 2:
            dropped += 1
            continue
        first_index = {}
        for o in orders[i]:
            first_index.setdefault(samples[i][o], o)
        golds = tuple(float(scores[i, first_index[r]]) for r in ranked)
        out.append(Comparison(prompt, tuple(ranked), where=f"simulated prompt {i}", gold=golds))
    if dropped:
        warnings.warn(
            f"dropped {dropped} prompts with fewer than two distinct non-empty samples", stacklevel=2
        )
    return out
