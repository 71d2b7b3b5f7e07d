"""``llm-env bench-throughput``: one flag per :class:`ThroughputSettings` field, a Markdown report, ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llm_env.config_cli import add_dataclass_arguments, dataclass_from_args
from llm_env.distributed import is_main_process
from rlhf_bench.throughput.measure import run_throughput
from rlhf_bench.throughput.report import format_report
from rlhf_bench.throughput.settings import ThroughputSettings

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Register ``llm-env bench-throughput`` (one flag per :class:`ThroughputSettings` field)."""
    parser = subparsers.add_parser(
        "bench-throughput",
        help="rollout throughput: the Gym-API env vs the floor, generate, the monolithic pipeline, the peers",
        description="Rollout throughput of the Gym-API environment against the floor (the unavoidable work), "
        "Hugging Face generate, the monolithic TRL-style pipeline, the no-cache loop and, when installed, TRL's "
        "GRPO and TorchRL's LLM rollouts, side by side in one process; see rlhf_bench.throughput.",
    )
    add_dataclass_arguments(parser, ThroughputSettings)
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    def log(message: str) -> None:
        if not args.quiet and is_main_process():
            print(message, file=sys.stderr, flush=True)

    try:
        settings = dataclass_from_args(ThroughputSettings, args)
        report = run_throughput(settings, log=log)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_main_process():  # under torchrun every rank measured; rank 0 reports
        return 0
    report["command"] = "llm-env " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llm-env") else None
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0
