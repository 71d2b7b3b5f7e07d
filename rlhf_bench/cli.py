"""The ``llm-env`` command line.

Each package contributes its subcommands through an ``add_parser(subparsers)`` function that registers a
parser and sets ``func`` (called with the parsed arguments, returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# "module" whose add_parser(subparsers) registers one or more subcommands.
_COMMANDS: tuple[str, ...] = (
    "rlhf_bench.leaderboard.cli",
    "rewards.cli",
    "agents.cli",
    "rlhf_bench.throughput.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-env",
        description="RLHF of language models as a Gymnasium environment: reward models, agents, benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
