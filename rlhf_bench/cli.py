"""The ``llm-env`` command line.

Each package contributes its subcommands through an ``add_parser(subparsers)`` function that registers a
parser and sets ``func`` (called with the parsed arguments, returning an exit status).

Under a distributed launcher every command runs on N processes with no other change:
``torchrun --nproc-per-node N -m rlhf_bench ppo ...`` (or ``accelerate launch -m rlhf_bench ...``). The
process group is started before the command runs (:func:`llm_env.distributed.init_distributed`) and
closed after it succeeds; an error on any rank ends that rank with its traceback (recorded for
torchrun's summary by ``@record``), and torchrun then stops the others.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import record

from llm_env.distributed import init_distributed, launched, shutdown_distributed

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
    args = build_parser().parse_args(argv)  # --help and usage errors exit here
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening
    # Under a launcher, record a failing rank's traceback for torchrun's summary of the run.
    return (record(_dispatch) if launched() else _dispatch)(args)


def _dispatch(args: argparse.Namespace) -> int:
    init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
    status = int(args.func(args) or 0)
    shutdown_distributed()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
