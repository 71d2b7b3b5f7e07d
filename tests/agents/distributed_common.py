"""What the data-parallel agent tests share: the tiny corpus and prompts, the toy reward and weight checks.

The test files are also the scripts that torchrun starts on every rank (``python test_x.py <stage> <dir>``):
they import this as ``tests.agents.distributed_common``, with the repository root on ``sys.path`` (pytest's
``pythonpath`` setting; ``PYTHONPATH`` for the launched ranks, see ``launch_ranks`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import hashlib

import torch

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
