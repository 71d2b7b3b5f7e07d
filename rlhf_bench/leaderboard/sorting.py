"""The built-in verifiable task: sort a few letters, scored by a checker.

Prompts ask for three to six letters (``a`` to ``j``, repeats allowed) in alphabetical order, one token per
letter: ``sort d b c b :``; the answer is `` b b c d``. The GPT-2-shaped policies of the benchmark learn it
partly from a minute of supervised training. A tenth of the demonstrations carry one wrong letter
(``noise``) and three tenths copy the prompt's letters unsorted (``copy``, a systematic mistake): the SFT
policy imitates both, and on the quick settings, sampled at temperature 1, sorts 17.7% of held-out samples
exactly (seed 0; mean checker score 0.573). Why the systematic mistake (version 2): with the slips alone
(version 1: 52-62% sorted) PPO did not rise significantly above the SFT policy on one seed of three, while
undoing one consistent wrong behaviour is a direction every optimiser finds (README, "Tasks": every
algorithm, every seed).

The checker gives partial credit, so that a nearly right answer tells which letters were misplaced: the
number of positions holding the letter the sorted sequence has there, over the longer of the two lengths.
The sorted sequence scores 1; `` b c b d`` for ``b b c d`` scores 2/4; an answer one letter too long loses
a position. The same function is the reward the agents optimise and the gold that scores them: there is no
reward model and no proxy gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_bench.leaderboard.artifacts import Artifacts
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.tasks import register_task
from rlhf_bench.leaderboard.verifiable import build_verifiable_artifacts, rlvr_settings

__all__ = ["SORTING_VERSION", "SortingTask", "build_sorting_artifacts", "check", "solve"]

SORTING_VERSION = 2
"""Bumped whenever the generator, the checker or the way artifacts are built changes, so cached artifacts
are rebuilt."""

LETTERS = tuple("abcdefghij")


@dataclass(frozen=True)
class SortingTask:
    """Generator and checker of the sorting task (a :class:`~rlhf_bench.leaderboard.VerifiableTask`).

    Args:
        seed: seeds prompts and demonstrations.
        min_letters: shortest sequence to sort.
        max_letters: longest sequence to sort.
        noise: share of demonstrations with one letter replaced by another.
        copy: share of demonstrations that copy the letters in the prompt's order instead of sorting them
            (a systematic mistake, drawn after the noise).
    """

    seed: int = 0
    min_letters: int = 3
    max_letters: int = 6
    noise: float = 0.1
    copy: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.min_letters <= self.max_letters:
            raise ValueError(
                f"need 1 <= min_letters <= max_letters, got {self.min_letters} and {self.max_letters}"
            )
        if not 0.0 <= self.noise <= 1.0 or not 0.0 <= self.copy <= 1.0 - self.noise:
            raise ValueError(
                f"need noise in [0, 1] and copy in [0, 1 - noise], got {self.noise} and {self.copy}"
            )

    def vocabulary(self) -> list[str]:
        """The letters, ``sort`` and ``:``."""
        return [*LETTERS, "sort", ":"]

    def prompts(self, n: int, *, stream: int) -> list[str]:
        """``n`` prompts from an independent stream (different streams never share their draws)."""
        rng = np.random.default_rng((self.seed, stream))
        out = []
        for _ in range(n):
            size = int(rng.integers(self.min_letters, self.max_letters + 1))
            out.append("sort " + " ".join(rng.choice(LETTERS, size=size)) + " :")
        return out

    def demonstrations(self, prompts: Sequence[str], *, stream: int) -> list[str]:
        """The sorted letters of each prompt (starting with a space), a ``noise`` share with one wrong and a
        ``copy`` share in the prompt's order (unsorted)."""
        rng = np.random.default_rng((self.seed, stream, 1))
        out = []
        for prompt in prompts:
            letters = solve(prompt)
            draw = rng.random()
            if self.noise <= draw < self.noise + self.copy:
                out.append(" " + " ".join(prompt.split()[1:-1]))
                continue
            if draw < self.noise:
                i = int(rng.integers(len(letters)))
                others = [c for c in LETTERS if c != letters[i]]
                letters[i] = others[int(rng.integers(len(others)))]
            out.append(" " + " ".join(letters))
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The checker (see the module docstring), one score in [0, 1] per response."""
        return [check(p, r) for p, r in zip(prompts, responses, strict=True)]


def solve(prompt: str) -> list[str]:
    """The sorted letters a prompt ``sort d b c :`` asks for."""
    words = prompt.split()
    if len(words) < 3 or words[0] != "sort" or words[-1] != ":" or not set(words[1:-1]) <= set(LETTERS):
        raise ValueError(f"not a sorting prompt ('sort d b c :', letters a to j): {prompt!r}")
    return sorted(words[1:-1])


def check(prompt: str, response: str) -> float:
    """Positions of ``response`` that hold the sorted sequence's letter, over the longer of the two."""
    target, words = solve(prompt), response.split()
    if not words:
        return 0.0
    return sum(a == b for a, b in zip(target, words)) / max(len(target), len(words))


@register_task(
    "sorting",
    settings=rlvr_settings,
    description="sort 3-6 letters ('sort d b c b :' -> 'b b c d'), scored by a checker that is both the "
    "reward and the gold (verifiable, no proxy gap)",
    version=SORTING_VERSION,
)
def build_sorting_artifacts(settings: BenchmarkSettings, *, directory: Path, **options: Any) -> Artifacts:
    """The sorting task's artifacts (:func:`~rlhf_bench.leaderboard.build_verifiable_artifacts`)."""
    return build_verifiable_artifacts(
        SortingTask(seed=settings.seed), settings, directory=directory, **options
    )
