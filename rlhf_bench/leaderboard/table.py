"""The leaderboard as a table: columns, cells with 95% intervals, significance marks and the caption that
says what the intervals cover (shared by the terminal, Markdown and HTML reports)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "COLUMNS",
    "CSV_FIELDS",
    "agent_label",
    "caption",
    "columns",
    "csv_fields",
    "format_table",
    "format_value",
    "interval_cell",
    "pass_at_k_ks",
    "ranked",
]


def interval_cell(key: str, digits: int) -> Callable[[dict[str, Any]], str]:
    """A cell ``mean [low, high]`` (just the mean when the interval is undefined, ``-`` without a mean)."""

    def cell(row: dict[str, Any]) -> str:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
        text = f"{value:.{digits}f}"
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            text += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return text

    return cell


def _plain(key: str, pattern: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: format_value(row.get(key), pattern)


def agent_label(row: dict[str, Any]) -> str:
    """The row's name with its mark: ``(best)`` for the best row, ``†`` for a row not significantly
    different from it."""
    if row.get("best"):
        return f"{row['agent']} (best)"
    if row.get("same_as_best"):
        return f"{row['agent']} †"
    return str(row["agent"])


COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...] = (
    ("agent", "agent", agent_label),
    ("gold", "gold score", interval_cell("gold", 3)),
    ("proxy", "proxy score", interval_cell("proxy", 3)),
    ("kl", "KL to SFT", interval_cell("kl", 2)),
    ("win_rate", "gold win-rate vs SFT", interval_cell("win_rate", 2)),
    ("sampled_tokens", "sampled tokens", _plain("sampled_tokens", "{:,.0f}")),
    ("reward_calls", "RM calls", _plain("reward_calls", "{:,.0f}")),
    ("gradient_steps", "grad steps", _plain("gradient_steps", "{:,.0f}")),
    ("wall_time_s", "wall time (s)", _plain("wall_time_s", "{:.1f}")),
    ("train_tokens_per_s", "train tokens/s", _plain("train_tokens_per_s", "{:.0f}")),
    ("tokens_per_s", "eval tokens/s", _plain("tokens_per_s", "{:.0f}")),
)
"""The leaderboard's columns: JSON key, title, cell formatter (intervals as ``mean [low, high]``).

:meta hide-value:
"""

#: The columns of ``leaderboard.csv`` in order, intervals as ``<metric>``, ``<metric>_low``, ``<metric>_high``
#: (:func:`csv_fields` adds the pass@k and paired-comparison columns a run carries).
CSV_FIELDS = (
    "agent",
    *(f"{m}{suffix}" for m in ("gold", "proxy", "kl", "win_rate") for suffix in ("", "_low", "_high")),
    "best",
    "same_as_best",
    "gap",
    "gap_low",
    "gap_high",
    "sampled_tokens",
    "reward_calls",
    "gradient_steps",
    "wall_time_s",
    "train_tokens_per_s",
    "tokens_per_s",
    "response_length",
    "seeds",
    "note",
)


def pass_at_k_ks(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The k of the pass@k the rows carry (their ``pass_at_{k}`` keys), ascending; none off a verifiable
    task."""
    keys = (
        re.fullmatch(r"pass_at_(\d+)", key) for row in rows for key, value in row.items() if value is not None
    )
    return sorted({int(match.group(1)) for match in keys if match})


def columns(rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, Callable[[dict[str, Any]], str]], ...]:
    """The columns of these rows: :data:`COLUMNS`, and on a verifiable task pass@1, its paired difference to
    the SFT policy's and pass@k at the largest k measured (16 by default) after the win-rate (the whole curve
    is in ``leaderboard.json`` and the CSV)."""
    ks = pass_at_k_ks(rows)
    at = [key for key, _, _ in COLUMNS].index("win_rate") + 1
    if any(row.get("turns") is not None for row in rows):  # a multi-turn task
        turns = (
            ("gold_vs_sft", "gold - SFT", interval_cell("gold_vs_sft", 3)),
            ("turns", "turns", _plain("turns", "{:.2f}")),
            ("response_length", "agent tokens", _plain("response_length", "{:.1f}")),
        )
        base = COLUMNS[:at] + turns + COLUMNS[at:]
        at += len(turns)
    else:
        base = COLUMNS
    if not ks:
        return base
    shown = tuple(
        (f"pass_at_{k}", f"pass@{k}", interval_cell(f"pass_at_{k}", 3))
        for k in dict.fromkeys((ks[0], ks[-1]))
    )
    if ks[0] == 1 and any(row.get("pass_at_1_vs_sft") is not None for row in rows):
        shown = (
            *shown[:1],
            ("pass_at_1_vs_sft", "pass@1 - SFT", interval_cell("pass_at_1_vs_sft", 3)),
            *shown[1:],
        )
    return base[:at] + shown + base[at:]


def csv_fields(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`CSV_FIELDS`, every ``pass_at_{k}`` with its interval when the rows carry pass@k, and a
    multi-turn task's turns and gold against the SFT policy's."""
    ks = pass_at_k_ks(rows)
    paired = ("pass_at_1_vs_sft", "pass_at_1_vs_sft_low", "pass_at_1_vs_sft_high") if 1 in ks else ()
    if any(row.get("turns") is not None for row in rows):
        paired += ("turns", "gold_vs_sft", "gold_vs_sft_low", "gold_vs_sft_high")
    return CSV_FIELDS + tuple(f"pass_at_{k}{suffix}" for k in ks for suffix in ("", "_low", "_high")) + paired


def format_value(value: Any, pattern: str) -> str:
    """``pattern.format(value)``, or ``-`` for a missing value (``None`` or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The leaderboard as aligned text (or a Markdown table), in the order given (see :func:`ranked`)."""
    shown = columns(rows)
    header = [title for _, title, _ in shown]
    body = [[cell(row) for _, _, cell in shown] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(cells[i]) for cells in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(cells) for cells in body)])


def caption(result: Any) -> str:
    """What the numbers of the leaderboard are and what their intervals cover."""
    stats = result.statistics
    settings = result.settings
    n_seeds = len(result.seeds)
    draws = stats.get("draws", settings.get("eval_samples"))
    metric = "gold" if result.has_gold else "proxy"
    seeds = f"{n_seeds} seed{'s' if n_seeds > 1 else ''} ({', '.join(map(str, result.seeds))})"
    text = (
        f"Means over {seeds}, {stats.get('prompts', settings.get('eval_prompts'))} held-out prompts and "
        f"{draws} draw{'s' if draws != 1 else ''} per prompt. Brackets: 95% intervals, {stats.get('method')} "
        f"({stats.get('resamples'):,} resamples, seed {stats.get('bootstrap_seed')}); they cover "
        f"{stats.get('covers')}. (best): the highest mean {metric} score; †: not significantly different "
        f"from it (the 95% interval of the paired difference in {metric} score contains 0). "
        "Budget columns: response tokens sampled and responses scored by the proxy reward model during "
        "training (best-of-k: its inference cost on the held-out answers), optimizer steps, training wall "
        "time without the evaluations, sampled tokens per second of it, and the generation throughput of the "
        "evaluation."
    )
    passes = getattr(result, "pass_at_k", None)
    if passes:
        text += (
            f" pass@k: the chance that at least one of k samples is correct "
            f"({passes.get('correct', 'the checker scores it 1')}), the "
            f"unbiased estimate (Chen et al. 2021) from {passes['samples']} samples on each held-out prompt, "
            "with the same intervals; pass@1 is the share of correct samples (best-of-k rows: none); "
            "pass@1 - SFT: its difference to the SFT policy's, paired by seed and prompt (above 0 when the "
            "interval excludes 0: RL raised the share of correct answers)."
        )
    if n_seeds > 1:
        text += f" {stats.get('shared', '').capitalize()}."
    changed = getattr(result, "task_settings", None)
    if changed:
        text += (
            " The task's own settings: "
            + ", ".join(f"{key} {value['task']} (preset {value['preset']})" for key, value in changed.items())
            + "."
        )
    return text


def ranked(rows: Sequence[Any], has_gold: bool) -> list[dict[str, Any]]:
    """Rows (``Row`` s or their dicts) as dicts, best mean gold (else proxy) first."""
    key = "gold" if has_gold else "proxy"
    dicts = [row if isinstance(row, dict) else row.as_dict() for row in rows]
    return sorted(dicts, key=lambda r: -(r[key] if r.get(key) is not None else -math.inf))
