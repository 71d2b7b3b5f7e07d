"""Scaling: every variant's throughput as a ratio of the floor's, across batch sizes and response lengths.

One ``llm-env bench-throughput`` measurement per (batch size, new tokens) cell, each in this process with
its variants interleaved as usual; the floor (the unavoidable work, see
:class:`~rlhf_bench.throughput.baselines.Floor`) runs in every cell and the others are reported as ratios of
it, so the table shows where a variant's fixed per-step cost matters (small batches, small models) and where
it vanishes behind the forward passes. Large cells (``large_tokens`` generated tokens or more) take
``large_repeats`` timed runs and no warm-up run: one run there lasts long enough that what a warm-up would
absorb (allocating caches) is noise.

Usage (the CPU sweep of docs/results/throughput.md; ``cpu.sh`` runs it)::

    python -m rlhf_bench.throughput.scaling --shape gpt2-small --threads 1 \\
        --out rlhf_bench/throughput/results/scaling-cpu

writes ``<out>.json`` (every cell's full report), ``<out>.md`` (the tables) and ``<out>.png`` (the plot);
the JSON is rewritten after every cell, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args
from rlhf_bench.throughput.measure import run_throughput
from rlhf_bench.throughput.models import SHAPES
from rlhf_bench.throughput.settings import DTypeName, ThroughputSettings

__all__ = ["ScalingSettings", "format_scaling", "main", "plot_scaling", "run_scaling"]


@dataclass
class ScalingSettings:
    """Options of the sweep; ``python -m rlhf_bench.throughput.scaling`` has one flag per field."""

    shape: str = field(default="gpt2-small", metadata={"choices": SHAPES})
    """Policy, reference and reward model shape (random weights)."""
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    """B of each row of the table."""
    new_tokens: tuple[int, ...] = (16, 64, 256, 512)
    """N of each column of the table."""
    prompt_length: int = 32
    """Prompt tokens per episode."""
    variants: tuple[str, ...] = ("floor", "env")
    """Variants measured in every cell (the floor is always added)."""
    repeats: int = 3
    """Timed runs per variant in a small cell."""
    warmup: int = 1
    """Untimed runs per variant before the timed ones in a small cell."""
    large_tokens: int = 4096
    """Cells that generate at least this many tokens (B x N) are large."""
    large_repeats: int = 1
    """Timed runs per variant in a large cell (no warm-up run)."""
    dtype: DTypeName = "float32"
    """Model dtype."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    threads: int | None = 1
    """torch.set_num_threads during the sweep; none keeps PyTorch's default."""
    seed: int = 0
    """Seed of the weights, the prompts and sampling."""
    out: str = "rlhf_bench/throughput/results/scaling-cpu"
    """Path of the outputs without extension: <out>.json, <out>.md and <out>.png."""

    def __post_init__(self) -> None:
        if "floor" not in self.variants:
            self.variants = ("floor", *self.variants)
        for name in ("batch_sizes", "new_tokens"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        for name in ("repeats", "large_repeats", "large_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.cell(self.batch_sizes[0], self.new_tokens[0])  # the benchmark validates the rest

    def cell(self, batch_size: int, new_tokens: int) -> ThroughputSettings:
        """The benchmark's settings of one cell."""
        large = batch_size * new_tokens >= self.large_tokens
        return ThroughputSettings(
            shape=self.shape,
            batch_size=batch_size,
            prompt_length=self.prompt_length,
            new_tokens=new_tokens,
            dtype=self.dtype,
            device=self.device,
            repeats=self.large_repeats if large else self.repeats,
            warmup=0 if large else self.warmup,
            threads=self.threads,
            variants=self.variants,
            seed=self.seed,
        )


def run_scaling(settings: ScalingSettings, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every cell; returns (and writes, after every cell) the sweep's report."""
    log = log or (lambda message: None)
    report: dict[str, Any] = {"settings": asdict(settings), "cells": []}
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for batch_size in settings.batch_sizes:
        for new_tokens in settings.new_tokens:
            start = time.perf_counter()
            log(f"cell batch {batch_size}, {new_tokens} new tokens")
            cell = run_throughput(settings.cell(batch_size, new_tokens), log=log)
            cell["wall_seconds"] = time.perf_counter() - start
            report["cells"].append(cell)
            out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report


def _cells(report: dict[str, Any]) -> dict[tuple[int, int], dict[str, Any]]:
    return {(c["settings"]["batch_size"], c["settings"]["new_tokens"]): c for c in report["cells"]}


def format_scaling(report: dict[str, Any]) -> str:
    """Markdown: the floor's tokens/s, then each variant's ratio to it, batch sizes down, lengths across."""
    s = report["settings"]
    cells = _cells(report)
    columns = [n for n in s["new_tokens"] if any((b, n) in cells for b in s["batch_sizes"])]
    head = "| batch \\ new tokens | " + " | ".join(str(n) for n in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)

    def table(title: str, value: Callable[[dict[str, Any]], str]) -> list[str]:
        lines = ["", title, "", head, rule]
        for b in s["batch_sizes"]:
            row = [value(cells[(b, n)]) if (b, n) in cells else "" for n in columns]
            lines.append(f"| {b} | " + " | ".join(row) + " |")
        return lines

    first = next(iter(cells.values()))
    env = first["environment"]
    large = any(b * n >= s["large_tokens"] for b, n in cells)
    lines = [
        f"{s['shape']} shape, prompt {s['prompt_length']}, {s['dtype']}, {env.get('gpu', env['cpu'])} "
        f"({env['device']}, {env['torch_threads']} threads); median of {s['repeats']} timed runs after "
        f"{s['warmup']} warm-up run(s)"
        + (
            f"; {s['large_repeats']} timed run(s), no warm-up, from {s['large_tokens']} tokens"
            if large
            else ""
        ),
    ]
    lines += table("floor (tokens/s)", lambda c: f"{c['variants']['floor']['tokens_per_s']:,.0f}")
    for name in s["variants"]:
        if name == "floor":
            continue

        for key, what in (("ratio_to_floor", ""), ("ratio_to_floor_cpu", ", tokens per CPU second")):

            def ratio(c: dict[str, Any], name: str = name, key: str = key) -> str:
                v = c["variants"].get(name)
                return f"{v[key]:.2f}" if v else "-"

            lines += table(f"{name} / floor{what}", ratio)
    lines += table(
        "1-minute load average after the cell's runs (min-max)",
        lambda c: "{:.1f}-{:.1f}".format(
            min(x for v in c["variants"].values() for x in v["load_average"]),
            max(x for v in c["variants"].values() for x in v["load_average"]),
        ),
    )
    return "\n".join(lines)


def plot_scaling(report: dict[str, Any], path: Path) -> None:
    """Each variant's ratio to the floor against the response length, one line per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    cells = _cells(report)
    names = [n for n in s["variants"] if n != "floor"]
    panels = [(name, key) for name in names for key in ("ratio_to_floor", "ratio_to_floor_cpu")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, key) in zip(axes[0], panels, strict=True):
        for b in s["batch_sizes"]:
            points = [
                (n, cells[(b, n)]["variants"][name][key])
                for n in s["new_tokens"]
                if (b, n) in cells and name in cells[(b, n)]["variants"]
            ]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=f"batch {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8, label="goal (0.9)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["new_tokens"], [str(n) for n in s["new_tokens"]])
        ax.minorticks_off()
        ax.set_xlabel("new tokens per response")
        ax.set_ylabel("tokens per " + ("CPU second" if key.endswith("cpu") else "second") + " / floor's")
        ax.set_title(f"{name} / floor, {'CPU time' if key.endswith('cpu') else 'wall clock'} ({s['shape']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_bench.throughput.scaling",
        description="Throughput of each variant as a ratio of the floor's, across batch sizes and lengths.",
    )
    add_dataclass_arguments(parser, ScalingSettings)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    try:
        settings = dataclass_from_args(ScalingSettings, args)
        report = run_scaling(
            settings, log=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True)
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(settings.out)
    table = format_scaling(report)
    out.with_suffix(".md").write_text(table + "\n")
    plot_scaling(report, out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
