"""What the data-parallel agent tests share: the tiny corpus and prompts, the toy reward and weight checks.

The test files are also the scripts that torchrun starts on every rank (``python test_x.py <stage> <dir>``):
they import this as ``tests.agents.distributed_common``, with the repository root on ``sys.path`` (pytest's
``pythonpath`` setting; ``PYTHONPATH`` for the launched ranks, see ``launch_ranks`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import gc
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llm_env.distributed import init_distributed, shutdown_distributed

CORPUS = [
    "the film was good and the actors were great",
    "the film was bad and the plot was dull",
    "a great movie with a good story and fine music",
    "i liked the actors but the ending was weak",
    "this book is long but the story is fun",
    "the food was cold and the service was slow",
]
PROMPTS = [
    "the film was",
    "a great movie",
    "i liked the",
    "this book is",
    "the food was",
    "the story is",
    "the actors were",
    "the plot was",
]


def good_count(prompts, responses):
    """A toy reward: how many times the response says "good"."""
    return [float(r.split().count("good")) for r in responses]


def digest(module: torch.nn.Module) -> str:
    """A hash of a (replicated) module's weights, to check that every rank holds the same."""
    h = hashlib.sha256()
    for _, tensor in sorted(module.state_dict().items()):
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def assert_same_weights(actual: dict, expected: dict, atol: float = 2e-5) -> None:
    """Same parameter names, and every tensor equal to float tolerance."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-4, msg=name)


def run_rank(scenarios: dict[str, Callable[[Path], None]]) -> None:
    """The rank's side of a test script: ``python test_x.py <scenario> <dir>`` under torchrun, one thread.

    After a scenario returns, the agents it built (their DDP / FSDP wrappers) are collected while the process
    group still exists, and the group is destroyed on every rank: a gloo group torn down at interpreter exit
    under a live DDP reducer aborts the process ("terminate called without an active exception") or hangs
    now and then, which failed a passing test. A scenario that raises skips this: its rank exits non-zero.
    """
    torch.set_num_threads(1)
    init_distributed()
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    scenarios[scenario](directory)
    gc.collect()
    shutdown_distributed()
