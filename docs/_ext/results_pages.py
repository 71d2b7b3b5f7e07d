"""Sphinx extension: the results pages' tables, generated from the recorded runs' ``leaderboard.json``.

Each recorded run lives in ``docs/results/data/<run>/``: a trimmed copy of the ``leaderboard.json`` the run
wrote (:func:`trim_payload`) and the plots a page shows. When the build starts (``builder-inited``) this
extension renders every run into Markdown files next to its JSON, which the pages include with
```` ```{include} ```` (they are generated, so git ignores them; ``docs/results/data/.gitignore``):

* ``table.md``: the leaderboard and its caption, exactly as the run's ``leaderboard.md`` has them
  (:func:`rlhf_bench.leaderboard.report.leaderboard_markdown`), then the pass@k table on a verifiable task;
* ``seeds.md``: on a run with several seeds, the paired difference to the SFT policy (pass@1, or gold on a
  multi-turn task) of every agent on every seed and pooled, from the run's per-seed rows;
* ``provenance.md``: the command, the git commit (and whether the checkout had uncommitted changes), the
  device and thread count, the versions and the run's total time, from its ``provenance``.

The extension also keeps ``results/data`` out of the documents Sphinx reads on its
own (they are included, not pages). To add a run::

    python docs/_ext/results_pages.py runs/benchmark/leaderboard.json docs/results/data/<run>/leaderboard.json
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from rlhf_bench.leaderboard.report import leaderboard_markdown
from rlhf_bench.leaderboard.table import interval_cell

DATA = Path("results") / "data"
"""Where the recorded runs live, relative to the documentation's source directory."""

PER_SEED_KEEP = ("seed", "leaderboard", "best_of_k", "budgets")
"""What :func:`trim_payload` keeps of each seed's entry (its curves and histories go)."""


def trim_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``leaderboard.json`` payload small enough to keep in the repository.

    It drops what the pages never show and what makes the file large: the sample generations
    (``samples``), the training histories (``histories``) and, in every seed's entry of ``per_seed``, its
    curves and histories. The summary rows, their intervals, every seed's rows, the averaged curves,
    best-of-k, the fits, the settings, the statistics and the ``provenance`` stay, so that
    :func:`~rlhf_bench.leaderboard.report.leaderboard_markdown` renders the trimmed copy exactly as it renders
    the full file. The full file is what the run's command writes.

    Args:
        payload: the parsed ``leaderboard.json`` of a run.

    Returns:
        A new dict; ``payload`` is not modified.
    """
    trimmed = {key: value for key, value in payload.items() if key not in ("samples", "histories")}
    trimmed["per_seed"] = [
        {key: value for key, value in run.items() if key in PER_SEED_KEEP}
        for run in payload.get("per_seed", [])
    ]
    return trimmed


def seed_table(payload: dict[str, Any]) -> str:
    """Every agent's paired difference to the SFT policy on each seed and pooled over the seeds, as a
    Markdown table (empty when the run had one seed or no paired difference).

    The difference is pass@1's on a verifiable task (``pass_at_1_vs_sft``) and the gold score's on a
    multi-turn one (``gold_vs_sft``, with pass@1's pooled next to it); each cell is ``mean [low, high]``,
    the seed's interval over its held-out prompts, the pooled one over seeds and prompts.
    """
    runs = payload.get("per_seed") or []
    rows = [row for row in payload["leaderboard"] if row["agent"] != "sft"]
    multi_turn = any(row.get("turns") is not None for row in rows)
    key = "gold_vs_sft" if multi_turn else "pass_at_1_vs_sft"
    if len(runs) < 2 or not any(row.get(key) is not None for row in rows):
        return ""
    title = "gold - SFT" if multi_turn else "pass@1 - SFT"
    by_seed = [{row["agent"]: row for row in run["leaderboard"]} for run in runs]
    header = ["agent", *(f"{title}, seed {run['seed']}" for run in runs), f"pooled ({len(runs)} seeds)"]
    if multi_turn:
        header.append("pass@1 - SFT, pooled")
    ks = sorted(int(k.split("_")[-1]) for k in rows[0] if k.startswith("pass_at_") and k[8:].isdigit())
    if ks:
        header.append(f"pass@{ks[-1]}")
    header.append("KL to SFT")
    cell = _signed(key)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["agent"], *(cell(seed.get(row["agent"], {})) for seed in by_seed), cell(row)]
        if multi_turn:
            cells.append(_signed("pass_at_1_vs_sft")(row))
        if ks:
            cells.append(_number(row.get(f"pass_at_{ks[-1]}"), 3))
        cells.append(_number(row.get("kl"), 2))
        lines.append("| " + " | ".join(cells) + " |")
    sft = [seed.get("sft", {}) for seed in by_seed]
    metric = "gold" if multi_turn else "pass_at_1"
    name = "gold score" if multi_turn else "pass@1"
    lines += [
        "",
        f"The SFT policy's {name} on seeds {', '.join(str(run['seed']) for run in runs)}: "
        + ", ".join(_number(row.get(metric), 3) for row in sft)
        + (
            f"; its pass@{ks[-1]} pooled: {_number(_sft_row(payload).get(f'pass_at_{ks[-1]}'), 3)}."
            if ks
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def provenance_line(payload: dict[str, Any]) -> str:
    """One Markdown paragraph saying how the run was made: its command, git commit (with "with uncommitted
    changes" when the checkout was dirty), device, CPU count and torch threads, torch version and total
    time, from the payload's ``provenance``."""
    prov = payload.get("provenance") or {}
    git = prov.get("git") or {}
    device = prov.get("device") or {}
    versions = prov.get("versions") or {}
    parts = [f"Command: `{prov.get('command', 'not recorded')}`"]
    if git.get("commit"):
        parts.append(
            f"commit `{git['commit'][:7]}`"
            + (" with uncommitted changes" if git.get("dirty") else " (clean checkout)")
        )
    where = [str(device.get("device", payload.get("device", "?")))]
    if device.get("cpu_count"):
        where.append(f"{device['cpu_count']} CPUs")
    if device.get("torch_threads"):
        where.append(f"{device['torch_threads']} torch thread{'s' if device['torch_threads'] != 1 else ''}")
    if device.get("gpu"):
        where.append(str(device["gpu"]))
    parts.append("device " + ", ".join(where))
    if versions.get("torch"):
        parts.append(f"torch {versions['torch']}")
    if payload.get("seconds") is not None:
        parts.append(
            f"{payload['seconds']:.0f} s from start to report (building the task's models included when the "
            "cache did not hold them)"
        )
    return "; ".join(parts) + ". Recorded in `leaderboard.json` (`provenance`).\n"


def every_seed(payload: dict[str, Any]) -> str:
    """Each seed's own leaderboard (leaderboard.md's "Every seed" tables, without its heading), for a
    multi-seed run without a paired difference to tabulate; ``(one seed)`` for a one-seed run."""
    if len(payload.get("per_seed") or []) < 2:
        return "(one seed)\n"
    whole = leaderboard_markdown(payload, per_seed=True, heading_level=2)
    return whole[whole.index("Each seed's own rows") :]


def render_run(directory: Path) -> list[Path]:
    """Write ``table.md``, ``seeds.md`` and ``provenance.md`` for the run in ``directory`` from its
    ``leaderboard.json``; return the files written (an unchanged file is not rewritten)."""
    payload = json.loads((directory / "leaderboard.json").read_text())
    written = []
    for name, text in (
        ("table.md", leaderboard_markdown(payload)),
        ("seeds.md", seed_table(payload) or every_seed(payload)),
        ("provenance.md", provenance_line(payload)),
    ):
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def _signed(key: str) -> Any:
    """A cell ``+mean [+low, +high]``: :func:`interval_cell` with the sign of every difference shown."""
    plain = interval_cell(key, 3)

    def cell(row: dict[str, Any]) -> str:
        text = plain(row)
        return text if text == "-" else re.sub(r"(?<![\d.])(\d)", r"+\1", text).replace("-+", "-")

    return cell


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _sft_row(payload: dict[str, Any]) -> dict[str, Any]:
    return next((row for row in payload["leaderboard"] if row["agent"] == "sft"), {})


def _builder_inited(app: Any) -> None:
    for path in sorted((Path(app.srcdir) / DATA).glob("*/leaderboard.json")):
        render_run(path.parent)


def _config_inited(app: Any, config: Any) -> None:
    config.exclude_patterns = [*config.exclude_patterns, "results/data/**"]


def setup(app: Any) -> dict[str, Any]:
    """Register the extension: render the recorded runs when the build starts."""
    app.connect("config-inited", _config_inited)
    app.connect("builder-inited", _builder_inited)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":  # python docs/_ext/results_pages.py FULL.json TRIMMED.json
    source, target = map(Path, sys.argv[1:3])
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(trim_payload(json.loads(source.read_text())), indent=1) + "\n")
    print(f"{target}: {target.stat().st_size:,} bytes")
