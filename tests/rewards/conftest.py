"""Fixtures of the reward-model tests: a learnable sentiment task and tiny reward models.

The gold rule is a bag-of-words sentiment score over a small word-level vocabulary, with fixed-length
responses so that it is a fixed-size sum a two-layer transformer can learn in seconds on a CPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm_env.tiny import tiny_gpt2, word_tokenizer
from rewards.model import RewardModel

WEIGHTS = {"great": 1.0, "good": 0.75, "fine": 0.25, "dull": -0.25, "bad": -0.75, "awful": -1.0}
# fmt: off
NEUTRAL = ["the", "a", "film", "book", "food", "plot", "music", "story", "actors", "service",
           "was", "is", "and", "but", "very", "quite"]
# fmt: on
VOCAB = [*WEIGHTS, *NEUTRAL]
TOPICS = ["film", "book", "food", "music", "plot", "story", "actors", "service"]
TASK_PROMPTS = [f"review {topic} {i} :" for topic in TOPICS for i in range(40)]
RESPONSE_WORDS = 6


def sentiment_gold(prompts, responses):
    """Gold score: the summed sentiment weight of the response's words."""
    return [sum(WEIGHTS.get(word, 0.0) for word in r.split()) for r in responses]


def word_policy(seed, length=RESPONSE_WORDS):
    """A sampling policy: ``length`` random words, about a third of them sentiment words."""
    rng = np.random.default_rng(seed)
    p = np.array([0.06] * len(WEIGHTS) + [0.64 / len(NEUTRAL)] * len(NEUTRAL))
    p /= p.sum()

    def sample(prompts, k):
        return [[" " + " ".join(rng.choice(VOCAB, size=length, p=p)) for _ in range(k)] for _ in prompts]

    return sample


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and far slower with two when another process shares the CPU.

    With the 2-core test machine shared, OpenMP's busy-waiting threads made the same training run take
    3 s on one thread and 20 to 90 s on two; the previous setting is restored after each test.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def task():
    """The sentiment task: ``gold``, ``policy(seed)``, ``prompts``, ``weights`` and its ``tokenizer``."""
    digits = " ".join(str(i) for i in range(40))
    tokenizer = word_tokenizer([" ".join(VOCAB), " ".join(TASK_PROMPTS), f"review : {digits}"])
    return SimpleNamespace(
        gold=sentiment_gold, policy=word_policy, prompts=TASK_PROMPTS, weights=WEIGHTS, tokenizer=tokenizer
    )


@pytest.fixture
def rm(tokenizer):
    """A fresh tiny GPT-2 reward model on the shared test tokenizer."""
    return RewardModel(tiny_gpt2(tokenizer, seed=7, classifier=True), tokenizer, batch_size=2)


@pytest.fixture
def write_jsonl(tmp_path):
    """Write rows (dicts, or raw strings for malformed lines) to a JSONL file and return its path."""
    import json

    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("\n".join(lines) + "\n")
        return path

    return write
