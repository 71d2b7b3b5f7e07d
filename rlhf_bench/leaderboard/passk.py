"""pass@k on verifiable tasks: the metric RLVR papers report, for every agent, against the SFT policy.

On a verifiable task the checker says whether an answer is correct (score 1, and only then). The gold column
is a sample's mean checker score, partial credit included; **pass@1** is the share of correct samples and
**pass@k** the chance that at least one of k samples is correct, what a user who can verify answers and
retry k times gets (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

Why the whole curve and not pass@1 alone: Yue et al. (2025, "Does Reinforcement Learning Really Incentivize
Reasoning Capacity in LLMs Beyond the Base Model?") find that RL with verifiable rewards raises pass@1
while the base model's pass@k catches up and overtakes it at large k: RL sharpens the policy around answers
the base model already samples, narrowing what it samples, rather than reaching new ones. A line that
crosses below the SFT policy's at large k in ``pass_at_k.png`` shows the same thing here.

How it is measured (:func:`measure_pass_at_k`): every evaluated agent (the SFT policy and every trained
one; not the best-of-k rows, which re-rank the SFT policy's samples by the checker itself) answers every
held-out prompt ``settings.pass_k_samples`` = n times through its leaderboard evaluation
(:meth:`~rlhf_bench.leaderboard.harness.BenchmarkContext.evaluate`, without the KL to the SFT policy that
its row already measures), and each prompt gets the unbiased estimate
:func:`~rlhf_bench.leaderboard.stats.pass_at_k` for k = 1, 2, 4, ... up to n. Those per-prompt values are
resampled like every other column (:mod:`~rlhf_bench.leaderboard.stats`: prompts, then seeds when there
are several). The cost is n x ``eval_prompts`` responses per agent; on the quick sorting task (128 x 16
responses of about 6 tokens) 2.4 to 5.4 s per agent on 2 CPU cores (SB3 PPO, which re-reads the whole
sequence at every token, 28 s): about a minute of the default quick run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_bench.leaderboard.harness import BenchmarkContext, EvalResult
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.stats import pass_at_k
from rlhf_bench.leaderboard.table import interval_cell, pass_at_k_ks

__all__ = [
    "measure_pass_at_k",
    "pass_at_k_description",
    "pass_at_k_table",
    "pass_ks",
    "per_prompt_pass_at_k",
    "plot_pass_at_k",
]

PLOT = "pass_at_k.png"


def pass_ks(n: int) -> tuple[int, ...]:
    """The k of the curve for ``n`` samples per prompt: the powers of two up to ``n`` (1, 2, 4, 8, 16 for
    the default 16 samples)."""
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample per prompt, got pass_k_samples={n}")
    return tuple(2**i for i in range(n.bit_length()))


def per_prompt_pass_at_k(
    result: EvalResult, ks: Sequence[int], *, success_score: float = 1.0
) -> dict[int, np.ndarray]:
    """k -> the unbiased pass@k of every prompt of ``result``, shape ``(num_prompts,)``, counting a response
    correct when its gold (the checker) scores at least ``success_score`` (1: exactly right; a task whose
    score also grades a correct answer sets its own, :attr:`~rlhf_bench.leaderboard.Artifacts.success_score`)."""
    if result.gold is None:
        raise ValueError("pass@k needs a checker: the result has no gold scores")
    n_prompts = result.num_prompts
    n = np.bincount(result.prompt_index, minlength=n_prompts)
    correct = result.gold >= success_score
    c = np.bincount(result.prompt_index, weights=correct, minlength=n_prompts).astype(np.int64)
    return {k: pass_at_k(n, c, k) for k in ks}


def measure_pass_at_k(ctx: BenchmarkContext, agent: Any, name: str) -> dict[int, np.ndarray]:
    """``settings.pass_k_samples`` answers of ``agent`` to every held-out prompt, through the leaderboard's
    evaluation, and their per-prompt pass@k (:func:`per_prompt_pass_at_k`); the seconds the sampling took
    are recorded as ``pass_at_k_seconds`` in the agent's records."""
    n = ctx.settings.pass_k_samples
    ks = pass_ks(n)
    start = time.perf_counter()
    result = ctx.evaluate(agent, name, samples=n, with_kl=False)
    ctx.record(name, pass_at_k_seconds=time.perf_counter() - start)
    return per_prompt_pass_at_k(result, ks, success_score=ctx.artifacts.success_score)


def pass_at_k_description(
    settings: BenchmarkSettings,
    n_prompts: int,
    records: dict[str, dict[str, Any]],
    *,
    success_score: float = 1.0,
) -> dict[str, Any]:
    """How pass@k was measured, for ``leaderboard.json`` (``pass_at_k``) and the captions; ``seconds``: the
    sampling time of every agent on the first seed."""
    n = settings.pass_k_samples
    return {
        "ks": list(pass_ks(n)),
        "samples": n,
        "prompts": n_prompts,
        "correct": "the checker scores the response exactly 1"
        if success_score == 1.0
        else f"the checker scores the response at least {success_score:g} (the task's success score)",
        "estimator": "unbiased, 1 - C(n - c, k) / C(n, k) per prompt from n samples with c correct (Chen et "
        "al. 2021), averaged over prompts (and seeds)",
        "intervals": "the leaderboard's bootstrap over prompts (and seeds), per k",
        "rows": "every evaluated agent but best-of-k (the SFT policy's samples re-ranked by the checker)",
        "seconds": {
            name: record["pass_at_k_seconds"]
            for name, record in records.items()
            if "pass_at_k_seconds" in record
        },
    }


def pass_at_k_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The pass@k curve of every row that has one, as a table: ``(header, body)`` of ``mean [low, high]``
    cells, one column per k."""
    ks = pass_at_k_ks(rows)
    if not ks:
        return [], []
    header = ["agent", *(f"pass@{k}" for k in ks)]
    body = [
        [str(row["agent"]), *(interval_cell(f"pass_at_{k}", 3)(row) for k in ks)]
        for row in rows
        if row.get(f"pass_at_{ks[0]}") is not None
    ]
    return header, body


def plot_pass_at_k(rows: Sequence[dict[str, Any]], description: dict[str, Any], path: Path) -> bool:
    """``pass_at_k.png``: pass@k against k (log2 axis), one line per agent with its 95% band, the SFT policy
    in black. Returns False (and writes nothing) when no row has pass@k."""
    ks = pass_at_k_ks(rows)
    measured = [row for row in rows if ks and row.get(f"pass_at_{ks[0]}") is not None]
    if not measured:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    others = [row for row in measured if row["agent"] != "sft"]
    cmap = plt.get_cmap("tab10" if len(others) <= 10 else "tab20")
    x = np.array(ks, dtype=float)
    for i, row in enumerate([*others, *(r for r in measured if r["agent"] == "sft")]):
        sft = row["agent"] == "sft"
        color = "black" if sft else cmap(i % cmap.N)
        y = np.array([row[f"pass_at_{k}"] for k in ks], dtype=float)
        low = np.array([_number(row.get(f"pass_at_{k}_low")) for k in ks])
        high = np.array([_number(row.get(f"pass_at_{k}_high")) for k in ks])
        ax.plot(
            x,
            y,
            color=color,
            linewidth=2.6 if sft else 1.3,
            marker="o",
            markersize=4 if sft else 3,
            zorder=3 if sft else 2,
            label=f"{row['agent']} (SFT policy)" if sft else row["agent"],
        )
        if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
            ax.fill_between(x, low, high, color=color, alpha=0.12 if sft else 0.08, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(k) for k in ks])
    ax.set(
        ylim=(-0.02, 1.02),
        xlabel="k (samples per prompt)",
        ylabel="pass@k (held-out)",
        title="pass@k: at least one of k samples correct",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"Unbiased estimator (Chen et al. 2021) from {description.get('samples')} samples on each of "
        f"{description.get('prompts')} held-out prompts; bands: 95% intervals. A line falling below SFT's at "
        "large k: RL narrowed what the policy samples (Yue et al. 2025)",
        fontsize=7,
        y=0.995,
        wrap=True,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _number(value: Any) -> float:
    return float("nan") if value is None or not math.isfinite(value) else float(value)
