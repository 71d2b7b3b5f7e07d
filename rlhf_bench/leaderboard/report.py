"""The benchmark's outputs: leaderboard (terminal, Markdown, CSV, JSON), plots, sample generations and the
self-contained ``report.html`` (:mod:`~rlhf_bench.leaderboard.html_report`).

Every score, win-rate and KL is shown as ``mean [low, high]``, its 95% interval
(:mod:`~rlhf_bench.leaderboard.stats`), and every row with what it consumed; ``efficiency.png`` draws the
gold score against the sampled tokens (sample efficiency) and against the KL to the SFT policy (the
frontier), one curve per agent with a token budget, with its interval band.

On a verifiable task the rows also carry pass@1 and pass@k (:mod:`~rlhf_bench.leaderboard.passk`), whose
curves ``pass_at_k.png`` draws against the SFT policy's. ``response_length.png`` draws, on every task, the
mean response length along training (the length bias of per-response length normalisation shows there).

The over-optimisation plot follows Gao, Schulman and Hilton (2022): gold and proxy scores against
``d = sqrt(KL(pi || pi_sft))``, with their functional forms fitted to the gain over the SFT policy,
``R(d) = d (alpha - beta d)`` for best-of-k and ``R(d) = d (alpha - beta log d)`` for RL.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from rlhf_bench.leaderboard.html_report import write_html
from rlhf_bench.leaderboard.passk import PLOT as PASS_AT_K_PLOT
from rlhf_bench.leaderboard.passk import pass_at_k_table, plot_pass_at_k
from rlhf_bench.leaderboard.table import (
    caption,
    csv_fields,
    format_table,
    format_value,
    interval_cell,
    ranked,
)

__all__ = ["fit_best_of_n", "fit_rl", "format_table", "leaderboard_markdown", "payload", "write_report"]


def fit_best_of_n(d: Sequence[float], gain: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``alpha, beta`` of ``gain = d (alpha - beta d)`` (Gao et al. 2022, best-of-n)."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -(d**2)], axis=1), gain, rcond=None)
    return float(alpha), float(beta)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``alpha, beta`` of ``gain = d (alpha - beta log d)`` (Gao et al. 2022, RL), d > 0."""
    d, gain = np.asarray(d, dtype=float), np.asarray(gain, dtype=float)
    keep = d > 1e-6
    d, gain = d[keep], gain[keep]
    if d.size < 2:
        return float("nan"), float("nan")
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -d * np.log(d)], axis=1), gain, rcond=None)
    return float(alpha), float(beta)


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    """A record without the per-prompt values of its curve points (they live in the intervals)."""
    if not record.get("curve"):
        return record
    return {**record, "curve": [{k: v for k, v in p.items() if k != "per_prompt"} for p in record["curve"]]}


def _budgets(records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: {"sampled_tokens": rec["sampled_tokens"], "token_budget": rec["token_budget"]}
        for name, rec in records.items()
        if "token_budget" in rec
    }


def payload(result: Any, rows: list[dict[str, Any]], fits: dict[str, Any]) -> dict[str, Any]:
    """Everything ``leaderboard.json`` holds (see :func:`write_report`)."""
    records = {name: _strip(rec) for name, rec in result.records.items()}
    return {
        "leaderboard": rows,
        "statistics": result.statistics,
        "seeds": result.seeds,
        "best_of_k": result.best_of_k,
        "fits": fits,
        "curves": result.curves,
        "histories": {name: rec.get("history") for name, rec in records.items() if rec.get("history")},
        "budgets": _budgets(records),
        "per_seed": [
            {
                "seed": run["seed"],
                "leaderboard": ranked(run["rows"], result.has_gold),
                "best_of_k": run["best_of_k"],
                "budgets": _budgets(run["records"]),
                "curves": {
                    name: _strip(rec)["curve"] for name, rec in run["records"].items() if rec.get("curve")
                },
                "histories": {
                    name: rec.get("history") for name, rec in run["records"].items() if rec.get("history")
                },
            }
            for run in result.per_seed
        ],
        "reward_models": {k: v for k, v in result.artifacts.items() if k.startswith("rm_")},
        "artifacts": result.artifacts,
        "settings": result.settings,
        "samples": result.samples,
        "seconds": result.seconds,
        "device": result.device,
        "provenance": result.provenance,
        "task": result.task,
        "task_settings": getattr(result, "task_settings", {}),
        "verifiable": result.verifiable,
        "pass_at_k": result.pass_at_k,
    }


def write_report(result: Any, out_dir: Path, *, log: Callable[[str], None] = print) -> None:
    """Write leaderboard.{md,csv,json}, samples.md, the PNG plots and report.html; print the table.

    ``leaderboard.json`` holds the summary rows (means, 95% intervals, marks, budget columns), how the
    intervals were computed (``statistics``), every seed's own rows, curves, budgets and histories
    (``per_seed``), the averaged curves (with the mean response length) and best-of-k points with intervals,
    on a verifiable task every row's pass@k curve (``pass_at_{k}`` keys) and how it was measured
    (``pass_at_k``), the Gao et al. fits, the reward models' accuracies, every setting, the samples, and the
    versions, git commit, device and command (``provenance``).
    """
    out_dir = Path(out_dir)
    rows = ranked(result.rows, result.has_gold)
    log("\n" + format_table(rows) + "\n\n" + caption(result) + "\n")
    fields = csv_fields(rows)
    with open(out_dir / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in fields})
    fits = _fits(result)
    data = payload(result, rows, fits)
    text = json.dumps(_strict(data), indent=2, default=_json_default, allow_nan=False)
    (out_dir / "leaderboard.json").write_text(text)
    (out_dir / "leaderboard.md").write_text(_markdown(result, rows, fits))
    (out_dir / "samples.md").write_text(_samples_markdown(result.samples))
    plots = _plots(result, out_dir, fits)
    write_html(result, rows, fits, [out_dir / name for name in plots], out_dir / "report.html")
    log(
        f"wrote {out_dir}/leaderboard.md, .csv, .json, samples.md, report.html and {len(plots)} plots "
        f"({', '.join(plots)})"
    )


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float (and numpy scalar or array) made JSON-safe: null for a
    number that is not one, so that any JSON parser reads the file."""
    if isinstance(value, dict):
        return {key: _strict(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _sft(result: Any) -> Any:
    return next((r for r in result.rows if r.agent == "sft"), None)


def _fits(result: Any) -> dict[str, Any]:
    """Gao et al. (2022) forms fitted to the gains over the SFT policy (best-of-k) and over each training
    curve's first point (RL), on the means over seeds."""
    fits: dict[str, Any] = {}
    sft = _sft(result)
    if sft is None:
        return fits
    if result.best_of_k:
        d = [math.sqrt(max(p["kl_theory"], 0.0)) for p in result.best_of_k]
        for metric, base in (("gold", sft.gold), ("proxy", sft.proxy)):
            gains = [p[metric] - base for p in result.best_of_k]
            if all(math.isfinite(g) for g in gains):
                fits[f"best_of_k_{metric}"] = dict(zip(("alpha", "beta"), fit_best_of_n(d, gains)))
    for name, curve in result.curves.items():
        d = [math.sqrt(max(p["kl"], 0.0)) if math.isfinite(p["kl"]) else float("nan") for p in curve]
        for metric in ("gold", "proxy"):
            gains = [p[metric] - curve[0][metric] for p in curve]
            if all(math.isfinite(g) for g in gains) and all(math.isfinite(x) for x in d):
                fits[f"{name}_{metric}"] = dict(zip(("alpha", "beta"), fit_rl(d, gains)))
    return fits


def _markdown(result: Any, rows: list[dict[str, Any]], fits: dict[str, Any]) -> str:
    lines = ["# RLHF benchmark leaderboard", ""]
    if result.verifiable:
        scoring = (
            "the task's checker is both the reward the agents optimise and the gold that scores them: no "
            "reward model, no proxy gap (the gold and proxy columns agree)."
        )
    elif result.has_gold:
        scoring = "the gold rater scores, the proxy reward models train the agents."
    else:
        scoring = "no gold rater: ranked by the proxy reward model."
    lines.append(
        f"Task `{result.task or 'your models'}`, device `{result.device}`, total {result.seconds:.0f}s. "
        "Agents train on the same environment and prompts and are scored on the same held-out prompts; "
        + scoring
    )
    budget = result.settings.get("token_budget")
    if budget is not None and any("token_budget" in rec for rec in result.records.values()):
        lines += [
            "",
            f"Budget: every policy-optimisation agent (PPO and its sweep, the critic-free agents, online DPO) "
            f"stops after the update at which its rollouts reach {budget:,} sampled response tokens; the "
            "budget columns say what each row consumed.",
        ]
    lines += ["", format_table(rows, markdown=True), "", caption(result), ""]
    notes = [f"* **{r['agent']}**: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    for key in ("rm_helpfulness", "rm_safety"):
        rm = result.artifacts.get(key)
        if rm:
            levels = ", ".join(f"{level} {v['accuracy']:.2f}" for level, v in rm["per_level"].items())
            lines.append(
                f"* {key}: held-out pairwise accuracy vs the noiseless gold {rm['accuracy']:.3f} ({levels})"
            )
    if result.best_of_k:
        lines += [
            "",
            "Best-of-k: KL measured (rank estimate) vs theory `log k - (k-1)/k`, with 95% intervals:",
            "",
        ]
        lines += ["| k | KL measured | KL theory | proxy | gold |", "|---|---|---|---|---|"]
        for p in result.best_of_k:
            lines.append(
                f"| {p['k']} | {interval_cell('kl_measured', 3)(p)} | {p['kl_theory']:.3f} | "
                f"{interval_cell('proxy', 3)(p)} | {interval_cell('gold', 3)(p)} |"
            )
    lines += _pass_at_k_lines(rows, result.pass_at_k)
    if fits:
        lines += [
            "",
            "Fitted Gao et al. (2022) forms (gain over the start, d = sqrt(KL), means over seeds):",
            "",
        ]
        for name, fit in fits.items():
            lines.append(f"* {name}: alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f}")
    if len(result.per_seed) > 1:
        lines += _per_seed_lines(
            [(run["seed"], ranked(run["rows"], result.has_gold)) for run in result.per_seed]
        )
    lines += [
        "",
        "Plots: `overoptimization.png`, `efficiency.png`, `training.png`, `reward_models.png`, "
        f"`response_length.png`{', `pass_at_k.png`' if result.pass_at_k else ''}. Samples: "
        "`samples.md`. Everything in one page: `report.html`. Versions, git commit, device: "
        "`leaderboard.json` (`provenance`).",
        "",
    ]
    return "\n".join(lines)


def _pass_at_k_lines(rows: list[dict[str, Any]], pass_at_k: dict[str, Any] | None) -> list[str]:
    """leaderboard.md's pass@k table with the line that introduces it (nothing off a verifiable task)."""
    header, body = pass_at_k_table(rows)
    if not body:
        return []
    return [
        "",
        f"pass@k, unbiased estimate from {(pass_at_k or {}).get('samples')} samples on each held-out prompt "
        "(Chen et al. 2021), with 95% intervals; an agent below the SFT policy at large k narrowed what "
        "it samples (Yue et al. 2025):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(cells) + " |" for cells in body),
    ]


def _per_seed_lines(runs: list[tuple[int, list[dict[str, Any]]]], level: int = 2) -> list[str]:
    """leaderboard.md's "Every seed" section: each seed's own table, ranked, under a heading of ``level``."""
    lines = [
        "",
        f"{'#' * level} Every seed",
        "",
        "Each seed's own rows, intervals over its evaluation prompts only.",
        "",
    ]
    for seed, rows in runs:
        lines += [f"{'#' * (level + 1)} Seed {seed}", "", format_table(rows, markdown=True), ""]
    return lines


def leaderboard_markdown(payload: dict[str, Any], *, per_seed: bool = False, heading_level: int = 2) -> str:
    """The Markdown leaderboard of a ``leaderboard.json`` payload (the dict :func:`payload` returns and
    :func:`write_report` saves), without running anything: the table and its caption exactly as the run's
    ``leaderboard.md`` has them, then, on a verifiable task, the pass@k table.

    The documentation's results pages render the recorded runs with it, so that their tables are generated
    from the JSON the run wrote, never retyped. A payload trimmed of its samples, histories and per-seed
    curves (the documentation keeps such copies) renders the same.

    Args:
        payload: the parsed ``leaderboard.json`` (keys ``leaderboard``, ``statistics``, ``seeds``,
            ``settings``, ``pass_at_k``, ``task_settings`` and, for ``per_seed=True``, ``per_seed``).
        per_seed: also append the "Every seed" section of ``leaderboard.md`` (each seed's own table) when
            the run had more than one seed.
        heading_level: the Markdown level of the "Every seed" heading (its seeds one level below).

    Returns:
        Markdown text: the table, a blank line, the caption, and the optional sections, ending in a newline.
    """
    rows = payload["leaderboard"]
    has_gold = any(row.get("gold") is not None for row in rows)
    result = SimpleNamespace(
        statistics=payload.get("statistics") or {},
        settings=payload.get("settings") or {},
        seeds=payload.get("seeds") or [],
        has_gold=has_gold,
        pass_at_k=payload.get("pass_at_k"),
        task_settings=payload.get("task_settings") or {},
    )
    lines = [format_table(rows, markdown=True), "", caption(result)]
    lines += _pass_at_k_lines(rows, payload.get("pass_at_k"))
    runs = payload.get("per_seed") or []
    if per_seed and len(runs) > 1:
        lines += _per_seed_lines([(run["seed"], run["leaderboard"]) for run in runs], heading_level)
    return "\n".join(lines).rstrip("\n") + "\n"


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    lines = ["# Sample generations on held-out prompts", ""]
    for entry in samples:
        lines += [f"## `{entry['prompt']}`", "", "| agent | response | gold | proxy |", "|---|---|---|---|"]
        for name, response in entry["responses"].items():
            text = response["text"].strip().replace("|", "\\|") or "(empty)"
            lines.append(
                f"| {name} | {text} | {format_value(response['gold'], '{:.2f}')} | {response['proxy']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _band(ax: Any, x: Any, points: list[dict[str, Any]], metric: str, color: Any, **kwargs: Any) -> None:
    """A curve of ``metric`` means with its 95% interval as a shaded band (when every point has one)."""
    y = np.array([p[metric] for p in points], dtype=float)
    ax.plot(x, y, color=color, **kwargs)
    low = np.array([p.get(f"{metric}_low", np.nan) for p in points], dtype=float)
    high = np.array([p.get(f"{metric}_high", np.nan) for p in points], dtype=float)
    if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
        ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)


def _bars(points: list[dict[str, Any]], metric: str) -> np.ndarray | None:
    """``errorbar`` offsets (2, n) of the 95% intervals of ``metric``, or None when one is undefined."""
    mean = np.array([p[metric] for p in points], dtype=float)
    low = np.array([p.get(f"{metric}_low", np.nan) for p in points], dtype=float)
    high = np.array([p.get(f"{metric}_high", np.nan) for p in points], dtype=float)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        return None
    return np.stack([mean - low, high - mean])


def _is_ppo_run(name: str) -> bool:
    return name == "ppo" or name.startswith("ppo-beta-")


def _plots(result: Any, out_dir: Path, fits: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sft = _sft(result)
    curves = result.curves
    interval_note = f"bands: 95% intervals ({len(result.seeds)} seed{'s' if len(result.seeds) > 1 else ''})"

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    points = [p for p in result.best_of_k if p["k"] > 1]  # k = 1 is the SFT policy, plotted at d = 0
    if points and sft is not None:
        start = {"gold": sft.gold, "proxy": sft.proxy}
        start.update(
            {f"{m}_{end}": getattr(sft, f"{m}_{end}") for m in ("gold", "proxy") for end in ("low", "high")}
        )
        d = np.array([0.0] + [math.sqrt(p["kl_theory"]) for p in points])
        grid = np.linspace(0, d.max() * 1.05, 50)
        for metric, color in (("gold", "tab:orange"), ("proxy", "tab:blue")):
            series = [start, *points]
            if not all(math.isfinite(p[metric]) for p in series):
                continue
            _band(ax, d, series, metric, color, marker="o", linestyle="none", label=f"{metric} (measured)")
            fit = fits.get(f"best_of_k_{metric}")
            if fit:
                ax.plot(
                    grid,
                    start[metric] + grid * (fit["alpha"] - fit["beta"] * grid),
                    "-",
                    color=color,
                    alpha=0.6,
                    label=f"{metric} fit d(α-βd)",
                )
        for p, x in zip(points, d[1:]):
            ax.annotate(f"k={p['k']}", (x, p["proxy"]), fontsize=7, textcoords="offset points", xytext=(2, 4))
    ax.set(title="Best-of-k: score vs sqrt(KL)", xlabel="sqrt(KL(best-of-k || SFT))", ylabel="score")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[1]
    cmap = plt.get_cmap("viridis")
    ppo = {name: curve for name, curve in curves.items() if _is_ppo_run(name)}
    for i, (name, curve) in enumerate(
        sorted(ppo.items(), key=lambda kv: result.records.get(kv[0], {}).get("kl_coef", 0))
    ):
        color = cmap(i / max(1, len(ppo) - 1))
        d = np.sqrt(np.maximum([p["kl"] for p in curve], 0.0))
        beta = result.records.get(name, {}).get("kl_coef")
        label = f"{name} (β={beta:g})" if beta is not None else name
        for metric, style, marker in (("proxy", "--", "o"), ("gold", "-", "s")):
            if all(math.isfinite(p[metric]) for p in curve):  # KL may turn back: bars, not bands
                ax.errorbar(
                    d,
                    [p[metric] for p in curve],
                    yerr=_bars(curve, metric),
                    color=color,
                    linestyle=style,
                    marker=marker,
                    markersize=3,
                    capsize=1.5,
                    elinewidth=0.6,
                    label=f"{label} {metric}",
                )
    ax.set(
        title="PPO: proxy (dashed) and gold (solid) vs sqrt(KL)", xlabel="sqrt(KL(π || SFT))", ylabel="score"
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(interval_note, fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(out_dir / "overoptimization.png", dpi=110)
    plt.close(fig)
    written.append("overoptimization.png")

    metric = "gold" if result.has_gold else "proxy"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    for i, (name, curve) in enumerate(curves.items()):
        color = cmap(i % cmap.N)
        tokens = np.array([p["sampled_tokens"] for p in curve], dtype=float)
        _band(axes[0], tokens, curve, metric, color, marker="o", markersize=3, label=name)
        if all(math.isfinite(p["kl"]) for p in curve):
            # KL need not grow monotonically along training: intervals as bars, not as a band.
            axes[1].errorbar(
                [p["kl"] for p in curve],
                [p[metric] for p in curve],
                xerr=_bars(curve, "kl"),
                yerr=_bars(curve, metric),
                color=color,
                marker="o",
                markersize=3,
                capsize=1.5,
                elinewidth=0.6,
                label=name,
            )
    # Rows without a training curve: their final point, with both intervals as error bars.
    shown_kl = [p["kl"] for curve in curves.values() for p in curve if math.isfinite(p["kl"])]
    limit = 3 * max(shown_kl) if shown_kl else math.inf
    hidden = []
    for row in result.rows:
        if row.agent in curves or not (math.isfinite(row.kl) and math.isfinite(getattr(row, metric))):
            continue
        if row.kl > limit:
            hidden.append(row.agent)
            continue
        point = row.as_dict()
        y = getattr(row, metric)
        axes[1].errorbar(
            row.kl,
            y,
            xerr=_bars([point], "kl"),
            yerr=_bars([point], metric),
            fmt="D",
            color="0.35",
            markersize=4,
            capsize=2,
        )
        axes[1].annotate(row.agent, (row.kl, y), fontsize=7, textcoords="offset points", xytext=(4, -9))
    axes[0].set(
        title=f"Sample efficiency: {metric} score vs sampled tokens",
        xlabel="response tokens sampled in training",
        ylabel=f"{metric} score (held-out)",
    )
    axes[1].set(
        title=f"KL frontier: {metric} score vs KL to SFT"
        + (f" ({', '.join(hidden)} off the chart)" if hidden else ""),
        xlabel="KL(π || SFT) per response",
        ylabel=f"{metric} score (held-out)",
    )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Every agent with a token budget, evaluated along training on {result.settings.get('curve_prompts')} "
        f"held-out prompts; grey diamonds: the other rows at the end; {interval_note}",
        fontsize=8,
        y=0.995,
    )
    fig.tight_layout()
    fig.savefig(out_dir / "efficiency.png", dpi=110)
    plt.close(fig)
    written.append("efficiency.png")

    histories = {name: rec["history"] for name, rec in result.records.items() if rec.get("history")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, history in histories.items():
        if history and "update" in history[0]:
            key = "sampled_tokens" if "sampled_tokens" in history[0] else "update"
            steps = [h[key] for h in history]
            axes[0].plot(steps, [h["score"] for h in history], label=name)
            axes[1].plot(steps, [h["kl"] for h in history], label=name)
        elif history and "round" in history[0]:
            rounds = [h["round"] for h in history]
            axes[2].plot(rounds, [h["sample_score"] for h in history], "o-", label=f"{name} mean of k")
            axes[2].plot(rounds, [h["best_score"] for h in history], "s--", label=f"{name} best of k")
    axes[0].set(title="Proxy score per rollout", xlabel="sampled response tokens", ylabel="proxy score")
    axes[1].set(title="KL to the reference per episode", xlabel="sampled response tokens", ylabel="KL")
    axes[2].set(title="Rejection sampling rounds", xlabel="round", ylabel="proxy score")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Training diagnostics of seed {result.seeds[0]}", fontsize=8, y=0.995)
    fig.tight_layout()
    fig.savefig(out_dir / "training.png", dpi=110)
    plt.close(fig)
    written.append("training.png")

    models = {k: v for k, v in result.artifacts.items() if k.startswith("rm_") and isinstance(v, dict)}
    if models:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(models)
        levels = ["significantly_better", "better", "slightly_better", "negligibly_better"]
        for i, (name, rm) in enumerate(models.items()):
            acc = [rm["per_level"].get(level, {}).get("accuracy", np.nan) for level in levels]
            ax.bar(np.arange(len(levels)) + i * width, acc, width, label=f"{name} (all {rm['accuracy']:.2f})")
        ax.set_xticks(
            np.arange(len(levels)) + width * (len(models) - 1) / 2,
            [lv.replace("_", " ") for lv in levels],
            fontsize=8,
        )
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set(
            ylim=(0, 1),
            ylabel="held-out accuracy vs gold",
            title="Reward models: accuracy per preference level",
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "reward_models.png", dpi=110)
        plt.close(fig)
        written.append("reward_models.png")

    _plot_response_length(plt, result, out_dir / "response_length.png")
    written.append("response_length.png")
    if result.pass_at_k and plot_pass_at_k(
        ranked(result.rows, result.has_gold), result.pass_at_k, out_dir / PASS_AT_K_PLOT
    ):
        written.append(PASS_AT_K_PLOT)
    return written


def _plot_response_length(plt: Any, result: Any, path: Path) -> None:
    """``response_length.png``: the mean response length (tokens) of every agent with a training curve along
    its sampled tokens, with its 95% band, and the other rows' final length as grey diamonds. A loss that
    divides each response's summed token losses by its own length weights the tokens of long wrong answers
    less, so wrong answers drift longer (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective"); Dr. GRPO's constant normaliser removes that bias, and the difference shows here."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("tab10" if len(result.curves) <= 10 else "tab20")
    for i, (name, curve) in enumerate(result.curves.items()):
        tokens = np.array([p["sampled_tokens"] for p in curve], dtype=float)
        _band(ax, tokens, curve, "response_length", cmap(i % cmap.N), marker="o", markersize=3, label=name)
    # Rows without a curve: their final length; one far above every curve (a random policy) is only named.
    means = [p["response_length"] for curve in result.curves.values() for p in curve]
    means = [v for v in means if v is not None and math.isfinite(v)]
    limit = 1.5 * max(means) if means else math.inf
    hidden = []
    for row in result.rows:
        length = getattr(row, "response_length", float("nan"))
        if row.agent in result.curves or not math.isfinite(length):
            continue
        if length > limit:
            hidden.append(f"{row.agent} {length:.1f}")
            continue
        x = row.sampled_tokens or 0.0
        ax.plot(x, length, "D", color="0.35", markersize=4)
        ax.annotate(row.agent, (x, length), fontsize=7, textcoords="offset points", xytext=(4, -9))
    ax.set(
        title="Mean response length along training"
        + (f" ({', '.join(hidden)}: off the chart)" if hidden else ""),
        xlabel="response tokens sampled in training",
        ylabel="mean response length (tokens, held-out)",
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Every agent with a token budget, evaluated along training on {result.settings.get('curve_prompts')} "
        "held-out prompts (bands: 95% intervals);\ngrey diamonds: the other rows on every held-out prompt at "
        "the end, at the tokens they sampled",
        fontsize=8,
        y=0.995,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
