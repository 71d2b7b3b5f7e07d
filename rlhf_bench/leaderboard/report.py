"""The benchmark's outputs: leaderboard (terminal, Markdown, CSV, JSON), plots, sample generations.

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
from typing import Any

import numpy as np

__all__ = ["fit_best_of_n", "fit_rl", "format_table", "write_report"]

COLUMNS = (
    ("agent", "agent", "{}"),
    ("gold", "gold score", "{:.3f}"),
    ("proxy", "proxy score", "{:.3f}"),
    ("kl", "KL to SFT", "{:.2f}"),
    ("win_rate", "gold win-rate vs SFT", "{:.2f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
    ("wall_time_s", "wall time (s)", "{:.1f}"),
)


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


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The leaderboard as aligned text (or a Markdown table), best gold (else proxy) first."""
    header = [title for _, title, _ in COLUMNS]
    body = [[_fmt(row.get(key), pattern) for key, _, pattern in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(cells[i]) for cells in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(cells) for cells in body)])


def _ranked(result: Any) -> list[dict[str, Any]]:
    key = "gold" if result.has_gold else "proxy"
    rows = [row.as_dict() for row in result.rows]
    return sorted(rows, key=lambda r: -(r[key] if r[key] is not None else -math.inf))


def write_report(result: Any, out_dir: Path, *, log: Callable[[str], None] = print) -> None:
    """Write leaderboard.{md,csv,json}, samples.md and the PNG plots; print the table."""
    out_dir = Path(out_dir)
    rows = _ranked(result)
    table = format_table(rows)
    log("\n" + table + "\n")
    with open(out_dir / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[key for key, _, _ in COLUMNS] + ["note"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in writer.fieldnames})
    fits = _fits(result)
    payload = {
        "leaderboard": rows,
        "best_of_k": result.best_of_k,
        "fits": fits,
        "curves": {name: rec.get("curve") for name, rec in result.records.items() if rec.get("curve")},
        "histories": {name: rec.get("history") for name, rec in result.records.items() if rec.get("history")},
        "budgets": {
            name: {"sampled_tokens": rec["sampled_tokens"], "token_budget": rec["token_budget"]}
            for name, rec in result.records.items()
            if "sampled_tokens" in rec
        },
        "reward_models": {k: v for k, v in result.artifacts.items() if k.startswith("rm_")},
        "artifacts": result.artifacts,
        "settings": result.settings,
        "samples": result.samples,
        "seconds": result.seconds,
        "device": result.device,
        "task": result.task,
        "verifiable": result.verifiable,
    }
    (out_dir / "leaderboard.json").write_text(json.dumps(payload, indent=2, default=_json_default))
    (out_dir / "leaderboard.md").write_text(_markdown(result, rows, fits))
    (out_dir / "samples.md").write_text(_samples_markdown(result.samples))
    plots = _plots(result, out_dir, fits)
    log(
        f"wrote {out_dir}/leaderboard.md, .csv, .json, samples.md and {len(plots)} plots ({', '.join(plots)})"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _fits(result: Any) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    sft = next((r for r in result.rows if r.agent == "sft"), None)
    if sft is None:
        return fits
    if result.best_of_k:
        d = [math.sqrt(max(p["kl_theory"], 0.0)) for p in result.best_of_k]
        for metric, base in (("gold", sft.gold), ("proxy", sft.proxy)):
            gains = [p[metric] - base for p in result.best_of_k]
            if all(math.isfinite(g) for g in gains):
                fits[f"best_of_k_{metric}"] = dict(zip(("alpha", "beta"), fit_best_of_n(d, gains)))
    for name, record in result.records.items():
        curve = record.get("curve")
        if not curve:
            continue
        d = [math.sqrt(max(p["kl"], 0.0)) for p in curve]
        for metric in ("gold", "proxy"):
            gains = [p[metric] - curve[0][metric] for p in curve]
            if all(math.isfinite(g) for g in gains):
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
    if budget is not None and any("sampled_tokens" in rec for rec in result.records.values()):
        lines += [
            "",
            f"Budget: every policy-optimisation agent (PPO and its sweep, the critic-free agents) stops after "
            f"the update at which its rollouts reach {budget:,} sampled response tokens; the notes say how "
            "many each sampled.",
        ]
    lines += ["", format_table(rows, markdown=True), ""]
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
        lines += ["", "Best-of-k: KL measured (rank estimate) vs theory `log k - (k-1)/k`:", ""]
        lines += ["| k | KL measured | KL theory | proxy | gold |", "|---|---|---|---|---|"]
        for p in result.best_of_k:
            lines.append(
                f"| {p['k']} | {p['kl_measured']:.3f} | {p['kl_theory']:.3f} | {p['proxy']:.3f} | {_fmt(p['gold'], '{:.3f}')} |"
            )
    if fits:
        lines += ["", "Fitted Gao et al. (2022) forms (gain over the start, d = sqrt(KL)):", ""]
        for name, fit in fits.items():
            lines.append(f"* {name}: alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f}")
    lines += [
        "",
        "Plots: `overoptimization.png`, `training.png`, `reward_models.png`. Samples: `samples.md`.",
        "",
    ]
    return "\n".join(lines)


def _samples_markdown(samples: list[dict[str, Any]]) -> str:
    lines = ["# Sample generations on held-out prompts", ""]
    for entry in samples:
        lines += [f"## `{entry['prompt']}`", "", "| agent | response | gold | proxy |", "|---|---|---|---|"]
        for name, response in entry["responses"].items():
            text = response["text"].strip().replace("|", "\\|") or "(empty)"
            lines.append(
                f"| {name} | {text} | {_fmt(response['gold'], '{:.2f}')} | {response['proxy']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plots(result: Any, out_dir: Path, fits: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sft = next((r for r in result.rows if r.agent == "sft"), None)
    curves = {name: rec["curve"] for name, rec in result.records.items() if rec.get("curve")}

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    points = [p for p in result.best_of_k if p["k"] > 1]  # k = 1 is the SFT policy, plotted at d = 0
    if points and sft is not None:
        d = np.array([0.0] + [math.sqrt(p["kl_theory"]) for p in points])
        grid = np.linspace(0, d.max() * 1.05, 50)
        for metric, base, color in (("gold", sft.gold, "tab:orange"), ("proxy", sft.proxy, "tab:blue")):
            values = np.array([base] + [p[metric] for p in points])
            if not np.all(np.isfinite(values)):
                continue
            ax.plot(d, values, "o", color=color, label=f"{metric} (measured)")
            fit = fits.get(f"best_of_k_{metric}")
            if fit:
                ax.plot(
                    grid,
                    base + grid * (fit["alpha"] - fit["beta"] * grid),
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
    for i, (name, curve) in enumerate(
        sorted(curves.items(), key=lambda kv: result.records[kv[0]].get("kl_coef", 0))
    ):
        color = cmap(i / max(1, len(curves) - 1))
        d = np.sqrt(np.maximum([p["kl"] for p in curve], 0.0))
        beta = result.records[name].get("kl_coef")
        label = f"{name} (β={beta:g})" if beta is not None else name
        ax.plot(d, [p["proxy"] for p in curve], "--o", color=color, markersize=3, label=f"{label} proxy")
        if all(math.isfinite(p["gold"]) for p in curve):
            ax.plot(d, [p["gold"] for p in curve], "-s", color=color, markersize=3, label=f"{label} gold")
    ax.set(
        title="PPO: proxy (dashed) and gold (solid) vs sqrt(KL)", xlabel="sqrt(KL(π || SFT))", ylabel="score"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "overoptimization.png", dpi=110)
    plt.close(fig)
    written.append("overoptimization.png")

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
    return written
