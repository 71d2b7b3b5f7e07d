"""Leaderboard rows: one agent's per-prompt values on one seed (:class:`SeedRow`), and their summary over
seeds with 95% intervals, what the row consumed, and whether it is distinguishable from the best
(:class:`Row`, :func:`summarise`).

Each metric of a row is the mean over seeds, held-out prompts and draws of:

* ``gold``, ``proxy``: the gold rater's and the proxy reward's score of the response;
* ``kl``: the summed per-token KL of the response to the SFT policy (as the environment measures it);
* ``win_rate``: 1 when the gold score (the proxy without a gold rater) beats the SFT policy's answer to the
  same prompt and draw on the same seed, 1/2 on a tie, 0 below.

On a verifiable task a row also carries ``pass@k`` (:mod:`~rlhf_bench.leaderboard.passk`): per prompt, the
unbiased estimate of the chance that one of k samples is correct, resampled like the metrics above, and
``pass_at_1_vs_sft``: its pass@1 minus the SFT policy's, paired by seed and prompt, with the interval of that
difference (RL raised the share of correct answers when it lies above 0).

The intervals come from :class:`~rlhf_bench.leaderboard.stats.Resampler` (prompts, and seeds when there
are several), and a row is *not significantly different from the best* when the paired interval of its
difference to the best row in the ranking metric contains 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rlhf_bench.leaderboard.harness import EvalResult, paired_wins
from rlhf_bench.leaderboard.stats import Estimate, Resampler, paired_difference, per_prompt_means

__all__ = ["METRICS", "Row", "SeedRow", "seed_row", "summarise"]

METRICS = ("gold", "proxy", "kl", "win_rate")
"""The leaderboard's measurements, each a mean of per-prompt values with a 95% interval."""


@dataclass
class SeedRow:
    """One row on one seed: per-prompt values of every metric and what the row consumed."""

    agent: str
    values: dict[str, np.ndarray]
    """Metric name -> per-prompt means over that prompt's draws, shape ``(prompts,)``."""
    sampled_tokens: float | None = None
    """Response tokens the row sampled (training, or for best-of-k the k samples per answer); None: unknown."""
    reward_calls: float | None = None
    """Responses the proxy reward scored for it (training, or for best-of-k its k per answer)."""
    gradient_steps: float | None = None
    """Optimizer steps of its training; None: unknown (an entry that records none)."""
    wall_time_s: float = 0.0
    """Seconds its factory took, evaluations along training excluded."""
    tokens_per_s: float = float("nan")
    """Generation throughput of its evaluation on the held-out prompts."""
    note: str = ""
    response_length: float = float("nan")
    """Mean length (tokens) of its responses to the held-out prompts; NaN when not measured (best-of-k)."""
    pass_at_k: dict[int, np.ndarray] = field(default_factory=dict)
    """k -> per-prompt pass@k on a verifiable task, shape ``(prompts,)``; empty on other tasks and for
    best-of-k (:func:`~rlhf_bench.leaderboard.passk.measure_pass_at_k`)."""
    turns: float = float("nan")
    """Mean turns of the agent per episode on a multi-turn task; NaN elsewhere."""


def seed_row(
    name: str,
    result: EvalResult,
    baseline: EvalResult | None,
    *,
    wall_time_s: float,
    note: str = "",
    sampled_tokens: float | None = None,
    reward_calls: float | None = None,
    gradient_steps: float | None = None,
) -> SeedRow:
    """A :class:`SeedRow` from an evaluation; the win-rate is paired with ``baseline`` (the SFT policy's
    evaluation on the same seed) by prompt and draw, and is 1/2 everywhere for the baseline itself."""
    n = result.num_prompts
    values = {metric: result.per_prompt(metric) for metric in ("gold", "proxy", "kl")}
    if baseline is None:
        values["win_rate"] = np.full(n, 0.5)
    else:
        index, wins = paired_wins(result, baseline, use_gold=result.gold is not None)
        values["win_rate"] = per_prompt_means(wins, index, n)
    return SeedRow(
        agent=name,
        values=values,
        sampled_tokens=sampled_tokens,
        reward_calls=reward_calls,
        gradient_steps=gradient_steps,
        wall_time_s=wall_time_s,
        tokens_per_s=result.tokens_per_s,
        note=note,
        response_length=float(np.mean(result.lengths)) if len(result.lengths) else float("nan"),
        turns=float(np.mean(result.turns))
        if result.turns is not None and len(result.turns)
        else float("nan"),
    )


@dataclass
class Row:
    """One leaderboard line: means over seeds and prompts with 95% intervals (``*_low``, ``*_high``), what
    the row consumed (means over seeds), and its standing against the best row."""

    agent: str
    gold: float
    proxy: float
    kl: float
    win_rate: float
    tokens_per_s: float
    """Generation throughput at evaluation (response tokens per second on the held-out prompts)."""
    wall_time_s: float
    """Training wall time (the factory's, without the evaluations along training)."""
    note: str = ""
    gold_low: float = float("nan")
    gold_high: float = float("nan")
    proxy_low: float = float("nan")
    proxy_high: float = float("nan")
    kl_low: float = float("nan")
    kl_high: float = float("nan")
    win_rate_low: float = float("nan")
    win_rate_high: float = float("nan")
    sampled_tokens: float | None = None
    reward_calls: float | None = None
    gradient_steps: float | None = None
    train_tokens_per_s: float = float("nan")
    """Sampled response tokens per second of training wall time (NaN when it sampled none)."""
    best: bool = False
    """The best row by the ranking metric (gold, or proxy without a gold rater)."""
    same_as_best: bool = False
    """Not significantly different from the best: the 95% interval of the paired difference contains 0."""
    gap: float = float("nan")
    """Mean of (this row - the best row) in the ranking metric, paired by seed and prompt."""
    gap_low: float = float("nan")
    gap_high: float = float("nan")
    seeds: int = 1
    response_length: float = float("nan")
    """Mean response length (tokens) at evaluation, over seeds (NaN: not measured); on a multi-turn task the
    agent's tokens per episode (the replies not counted)."""
    turns: float = float("nan")
    """Mean turns of the agent per episode on a multi-turn task, over seeds; NaN elsewhere."""
    pass_at_k: dict[int, Estimate] = field(default_factory=dict)
    """k -> pass@k with its interval on a verifiable task (empty otherwise); :meth:`as_dict` writes them as
    ``pass_at_{k}``, ``pass_at_{k}_low`` and ``pass_at_{k}_high``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else a row carries into ``leaderboard.json`` (e.g. best-of-k's theoretical KL)."""

    def as_dict(self) -> dict[str, Any]:
        """The row as ``leaderboard.json`` stores it: flat JSON values, pass@k as ``pass_at_{k}`` with
        ``_low`` / ``_high``, ``extra`` merged in, and NaN written as ``None``."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("extra", "pass_at_k")}
        for k, estimate in self.pass_at_k.items():
            out.update(
                {
                    f"pass_at_{k}": estimate.mean,
                    f"pass_at_{k}_low": estimate.low,
                    f"pass_at_{k}_high": estimate.high,
                }
            )
        out.update(self.extra)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _mean(values: Sequence[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if len(known) == len(values) and known else None


def summarise(
    per_seed: Sequence[Sequence[SeedRow]], resampler: Resampler, rank_by: str = "gold"
) -> list[Row]:
    """The rows of every seed (``per_seed[i]``: seed i's rows, same agents in the same order) as
    :class:`Row` s with intervals from ``resampler`` (its shape must be ``(seeds, prompts)``), the best row by
    ``rank_by`` marked, and every row whose paired difference to it has an interval containing 0 marked
    ``same_as_best``. Rows with pass@k get its intervals from the same ``resampler`` (pass@k is measured on
    the same held-out prompts)."""
    if rank_by not in METRICS:
        raise ValueError(f"rank_by must be one of {METRICS}, got {rank_by!r}")
    if not per_seed or len(per_seed) != resampler.shape[0]:
        raise ValueError(f"{len(per_seed)} seeds of rows for a resampler of shape {resampler.shape}")
    names = [row.agent for row in per_seed[0]]
    for rows in per_seed[1:]:
        if [row.agent for row in rows] != names:
            raise ValueError(
                f"every seed needs the same rows in the same order, got {[r.agent for r in rows]} vs {names}"
            )
    stacked: dict[str, dict[str, np.ndarray]] = {
        name: {metric: np.stack([rows[i].values[metric] for rows in per_seed]) for metric in METRICS}
        for i, name in enumerate(names)
    }
    out = []
    for i, name in enumerate(names):
        cells = [rows[i] for rows in per_seed]
        fields: dict[str, Any] = {}
        for metric in METRICS:
            estimate = resampler.estimate(stacked[name][metric])
            fields[metric], fields[f"{metric}_low"], fields[f"{metric}_high"] = (
                estimate.mean,
                estimate.low,
                estimate.high,
            )
        ks = sorted(cells[0].pass_at_k)
        if any(sorted(c.pass_at_k) != ks for c in cells):
            raise ValueError(f"{name} has pass@k for different k on different seeds")
        pass_at_k = {k: resampler.estimate(np.stack([c.pass_at_k[k] for c in cells])) for k in ks}
        wall = float(np.mean([c.wall_time_s for c in cells]))
        sampled = _mean([c.sampled_tokens for c in cells])
        out.append(
            Row(
                agent=name,
                tokens_per_s=float(np.mean([c.tokens_per_s for c in cells])),
                wall_time_s=wall,
                note=cells[0].note,
                sampled_tokens=sampled,
                reward_calls=_mean([c.reward_calls for c in cells]),
                gradient_steps=_mean([c.gradient_steps for c in cells]),
                train_tokens_per_s=sampled / wall if sampled and wall > 0 else float("nan"),
                seeds=len(per_seed),
                response_length=float(np.mean([c.response_length for c in cells])),
                turns=float(np.mean([c.turns for c in cells])),
                pass_at_k=pass_at_k,
                **fields,
            )
        )
    # pass@1 against the SFT policy's, paired by seed and prompt: whether RL raised the share of correct
    # answers, which the claims of a verifiable task are about (``pass_at_1_vs_sft`` and its interval).
    if "sft" in names and 1 in per_seed[0][names.index("sft")].pass_at_k:
        sft = np.stack([rows[names.index("sft")].pass_at_k[1] for rows in per_seed])
        for i, row in enumerate(out):
            if 1 in row.pass_at_k:
                diff = paired_difference(
                    np.stack([rows[i].pass_at_k[1] for rows in per_seed]), sft, resampler
                )
                row.extra.update(
                    pass_at_1_vs_sft=diff.mean, pass_at_1_vs_sft_low=diff.low, pass_at_1_vs_sft_high=diff.high
                )
    # The ranking metric against the SFT policy's, paired by seed and prompt (``{rank_by}_vs_sft``): whether
    # training raised it, what a multi-turn task's claims are about.
    if "sft" in names:
        for row in out:
            diff = paired_difference(stacked[row.agent][rank_by], stacked["sft"][rank_by], resampler)
            row.extra.update(
                {
                    f"{rank_by}_vs_sft": diff.mean,
                    f"{rank_by}_vs_sft_low": diff.low,
                    f"{rank_by}_vs_sft_high": diff.high,
                }
            )
    ranked = [row for row in out if math.isfinite(getattr(row, rank_by))]
    if ranked:
        best = max(ranked, key=lambda row: getattr(row, rank_by))
        best.best = True
        for row in out:
            gap = paired_difference(stacked[row.agent][rank_by], stacked[best.agent][rank_by], resampler)
            row.gap, row.gap_low, row.gap_high = gap.mean, gap.low, gap.high
            row.same_as_best = row is best or gap.contains(0.0)
    return out
