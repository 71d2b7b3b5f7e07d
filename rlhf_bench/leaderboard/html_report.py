"""``report.html``: the whole benchmark run on one self-contained page.

The leaderboard with its intervals and significance marks, every plot (PNG embedded as base64 ``data:``
URIs), the best-of-k and Gao et al. tables, every agent's answers to the same held-out prompts side by
side, every setting, and the versions, git commit and device. The CSS is inline and there are no scripts
and no external references, so the file opens offline in any browser and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_bench.leaderboard.passk import pass_at_k_table
from rlhf_bench.leaderboard.table import caption, columns, format_table, interval_cell, ranked

__all__ = ["render_html", "write_html"]

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 2em;
     border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; } h3 { font-size: 1.05em; }
.meta { color: #57606a; font-size: 0.92em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.86em; }
th, td { border: 1px solid #d0d7de; padding: 0.28em 0.55em; vertical-align: top; }
th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.best td { background: #dafbe1; } tr.tied td { background: #f0fff4; }
caption { caption-side: bottom; text-align: left; color: #57606a; font-size: 0.95em; padding-top: 0.5em;
          max-width: 1100px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; }
.response { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.95em; }
.samples td { max-width: 560px; } code { background: #f6f8fa; padding: 0 0.25em; }
details summary { cursor: pointer; color: #0969da; }
"""

PLOT_CAPTIONS = {
    "overoptimization.png": "Over-optimisation (Gao et al. 2022): best-of-k and PPO's gold and proxy scores "
    "against sqrt(KL to the SFT policy), with the fitted functional forms; bands are 95% intervals.",
    "efficiency.png": "Sample efficiency (score against the response tokens sampled in training) and the KL "
    "frontier (score against KL to the SFT policy) of every agent with a token budget, evaluated along "
    "training; the other rows at the end of training as grey diamonds; bands and bars are 95% intervals.",
    "training.png": "Training diagnostics of the first seed: proxy score and KL per rollout, rejection-sampling "
    "rounds.",
    "reward_models.png": "The proxy reward models' held-out pairwise accuracy against the noiseless gold, per "
    "Llama 2 preference level.",
    "response_length.png": "Mean response length (tokens) on held-out prompts along training, for every agent "
    "with a token budget (bands: 95% intervals), and the other rows' final length: per-response length "
    "normalisation lets wrong answers grow longer (Liu et al. 2025), which Dr. GRPO removes.",
    "pass_at_k.png": "pass@k against k, every agent against the SFT policy (black): the unbiased estimate "
    "(Chen et al. 2021), bands are 95% intervals. An agent above SFT at k = 1 but below it at large k sharpened "
    "its policy by narrowing what it samples (Yue et al. 2025).",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, pattern: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return pattern.format(value)


def _leaderboard(result: Any, rows: Sequence[dict[str, Any]]) -> str:
    shown = columns(rows)
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in shown)
    body = []
    for row in rows:
        kind = "best" if row.get("best") else "tied" if row.get("same_as_best") else ""
        cells = "".join(
            f"<td{'' if key == 'agent' else ' class=num'}>{_e(cell(row))}</td>" for key, _, cell in shown
        )
        body.append(f'<tr class="{kind}">{cells}</tr>' if kind else f"<tr>{cells}</tr>")
    return (
        f"<table class=leaderboard><caption>{_e(caption(result))}</caption>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _notes(rows: Sequence[dict[str, Any]]) -> str:
    items = "".join(f"<li><b>{_e(r['agent'])}</b>: {_e(r['note'])}</li>" for r in rows if r.get("note"))
    return f"<ul>{items}</ul>" if items else ""


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{_e(path.name)}">'
        f"<figcaption><code>{_e(path.name)}</code>: {_e(PLOT_CAPTIONS.get(path.name, ''))}</figcaption></figure>"
    )


def _best_of_k(result: Any) -> str:
    if not result.best_of_k:
        return ""
    rows = "".join(
        f"<tr><td class=num>{p['k']}</td><td class=num>{_e(interval_cell('kl_measured', 3)(p))}</td>"
        f"<td class=num>{p['kl_theory']:.3f}</td><td class=num>{_e(interval_cell('proxy', 3)(p))}</td>"
        f"<td class=num>{_e(interval_cell('gold', 3)(p))}</td></tr>"
        for p in result.best_of_k
    )
    return (
        "<h3>Best-of-k</h3><table><thead><tr><th>k</th><th>KL measured (rank estimate)</th>"
        "<th>KL theory log k - (k-1)/k</th><th>proxy</th><th>gold</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _pass_at_k(result: Any, rows: Sequence[dict[str, Any]]) -> str:
    header, body = pass_at_k_table(rows)
    if not body:
        return ""
    head = "".join(f"<th>{_e(title)}</th>" for title in header)
    lines = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i else ''}>{_e(c)}</td>" for i, c in enumerate(cells))
        + "</tr>"
        for cells in body
    )
    return (
        f"<h3>pass@k</h3><p class=meta>Unbiased estimate (Chen et al. 2021) from {result.pass_at_k['samples']} "
        "samples on each held-out prompt, with 95% intervals.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>"
    )


def _fits(fits: dict[str, Any]) -> str:
    if not fits:
        return ""
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td class=num>{_number(fit['alpha'])}</td><td class=num>{_number(fit['beta'])}</td></tr>"
        for name, fit in fits.items()
    )
    return (
        "<h3>Gao et al. (2022) fits</h3><p class=meta>Gain over the start against d = sqrt(KL): d (α - β d) for "
        "best-of-k, d (α - β log d) along RL training; on the means over seeds.</p>"
        f"<table><thead><tr><th>curve</th><th>α</th><th>β</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _reward_models(result: Any) -> str:
    rows = []
    for key in ("rm_helpfulness", "rm_safety"):
        rm = result.artifacts.get(key)
        if rm:
            levels = ", ".join(
                f"{level.replace('_', ' ')} {v['accuracy']:.2f}" for level, v in rm["per_level"].items()
            )
            rows.append(
                f"<tr><td>{_e(key)}</td><td class=num>{rm['accuracy']:.3f}</td><td>{_e(levels)}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<h3>Proxy reward models</h3><table><thead><tr><th>model</th><th>held-out accuracy vs gold</th>"
        f"<th>per preference level</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _samples(samples: Sequence[dict[str, Any]]) -> str:
    blocks = []
    for entry in samples:
        rows = "".join(
            f"<tr><td>{_e(name)}</td><td class=response>{_e(response['text'].strip() or '(empty)')}</td>"
            f"<td class=num>{_number(response['gold'], '{:.2f}')}</td>"
            f"<td class=num>{_number(response['proxy'], '{:.2f}')}</td></tr>"
            for name, response in entry["responses"].items()
        )
        blocks.append(
            f"<h3 class=response>{_e(entry['prompt'])}</h3><table class=samples><thead><tr><th>agent</th>"
            f"<th>response</th><th>gold</th><th>proxy</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(blocks)


def _key_values(title: str, values: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(key)}</code></td><td>{_e(json.dumps(value) if not isinstance(value, str) else value)}</td></tr>"
        for key, value in values.items()
    )
    return f"<h3>{_e(title)}</h3><table><tbody>{rows}</tbody></table>"


def _per_seed(result: Any) -> str:
    if len(result.per_seed) < 2:
        return ""
    blocks = []
    for run in result.per_seed:
        table = format_table(ranked(run["rows"], result.has_gold))
        blocks.append(f"<h3>Seed {run['seed']}</h3><pre>{_e(table)}</pre>")
    return (
        "<details><summary>Every seed's own leaderboard (intervals over its evaluation prompts only)</summary>"
        f"{''.join(blocks)}</details>"
    )


def render_html(
    result: Any, rows: Sequence[dict[str, Any]], fits: dict[str, Any], plots: Sequence[Path]
) -> str:
    """The page as a string (see the module docstring)."""
    provenance = result.provenance or {}
    git = provenance.get("git") or {}
    versions = provenance.get("versions") or {}
    device = provenance.get("device") or {"device": result.device}
    commit = git.get("commit")
    seeds = ", ".join(map(str, result.seeds))
    budget = result.settings.get("token_budget")
    summary = (
        f"Device <code>{_e(result.device)}</code>, {result.seconds:.0f} s in all, seeds {_e(seeds)}, "
        + (
            f"commit <code>{_e(commit[:12])}</code>{' (uncommitted changes)' if git.get('dirty') else ''}, "
            if commit
            else ""
        )
        + f"llm-env {_e(versions.get('llm-env') or 'from a checkout')}, torch {_e(versions.get('torch'))}."
    )
    if result.verifiable:
        scoring = (
            "Every agent trains against the task's checker on the same environment and prompts and is scored "
            "on the same held-out prompts by the same checker: no reward model, no proxy gap."
        )
    else:
        scoring = (
            "Every agent trains against the proxy reward models on the same environment and prompts and is "
            "scored on the same held-out prompts by "
            + ("the gold rater." if result.has_gold else "the proxy (no gold rater was given).")
        )
    name = result.task
    task = (
        (f"Task {name}. " if name else "")
        + scoring
        + (
            f" Policy-optimisation agents stop at the update whose rollouts reach {budget:,} sampled response "
            "tokens."
            if budget
            else ""
        )
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>RLHF benchmark report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>RLHF benchmark report</h1>",
        f"<p class=meta>{summary}</p>",
        f"<p>{_e(task)}</p>",
        "<h2>Leaderboard</h2>",
        _leaderboard(result, rows),
        _notes(rows),
        _per_seed(result),
        "<h2>Plots</h2>",
        *(_figure(path) for path in plots),
        "<h2>Measurements</h2>",
        _best_of_k(result),
        _pass_at_k(result, rows),
        _fits(fits),
        _reward_models(result),
        "<h2>Samples</h2>",
        "<p class=meta>Every agent's first answer to the same held-out prompts (first seed), with its gold and "
        "proxy scores.</p>",
        _samples(result.samples),
        "<h2>How it was run</h2>",
        _key_values("Statistics", result.statistics),
        _key_values("Versions", versions),
        _key_values("Git", git or {"commit": "not in a git checkout"}),
        _key_values("Device", device),
        _key_values("Command", {"command": provenance.get("command")}),
        _key_values("Settings", result.settings),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part)


def write_html(
    result: Any, rows: Sequence[dict[str, Any]], fits: dict[str, Any], plots: Sequence[Path], path: Path
) -> Path:
    """Write :func:`render_html` to ``path``."""
    path = Path(path)
    path.write_text(render_html(result, rows, fits, plots), encoding="utf-8")
    return path
