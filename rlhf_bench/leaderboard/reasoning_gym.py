"""The field's reasoning tasks: any dataset of reasoning-gym as a verifiable benchmark task, through one adapter.

reasoning-gym (Stojanovski et al. 2025, "REASONING GYM: Reasoning Environments for Reinforcement Learning
with Verifiable Rewards") is a library of about a hundred procedural generators (arithmetic, algorithms,
logic, games, ...): each draws questions from a seed and a difficulty config, and each brings its own
verifier, ``score_answer``, a score in [0, 1]. Those are the three things a
:class:`~rlhf_bench.leaderboard.verifiable.VerifiableTask` needs, so one adapter, :class:`ReasoningGymTask`,
turns every dataset into a benchmark task: the questions are the prompts, the generator's answers the SFT
demonstrations, and its ``score_answer`` the checker, both the reward the agents optimise and the gold
that scores them. ``llm-env benchmark --task reasoning-gym:<dataset>`` runs any dataset with its default
config; the registered names (:data:`REGISTERED`) run datasets at difficulties the benchmark's tiny
policies learn partly on CPU, so that RL has room above the SFT policy.

* **Prompts** are the question followed by ``"\\nAnswer:"``; responses start with a space (`` 7``), as on the
  other verifiable tasks. The dataset of stream ``s`` is created with the seed ``(seed * 64 + s) * 2**16``:
  reasoning-gym draws item ``i`` from ``Random(dataset_seed + i)``, so streams 65,536 items apart never share
  a draw (a prompt text may still recur across streams when the task has few distinct questions).
* **Tokens** are characters (:func:`llm_env.tiny.char_tokenizer`): questions are free text with digits,
  punctuation and newlines that no word vocabulary covers. The vocabulary is printable ASCII plus every
  character of a sample of the task's prompts and demonstrations.
* **Scratchpads**: where an answer needs intermediate results, the demonstrations reason before it (the
  binary digits of ``rg-count-bits``, `` 1001 answer: 2``; :func:`running_sums` for chains of sums), and the
  checker scores what follows the last ``answer:`` of the response (no marker: no answer, score 0). How long
  the policy reasons is then part of what the algorithms shape; on ``rg-count-bits`` the SFT policy's
  count follows the digits it wrote, right or wrong, so rewarding the answer rewards the conversion.
* **Noise**: a ``noise`` share of the demonstrations carry a wrong answer (an integer off by one or two, or
  one character changed; with a scratchpad, a slip in its last step), so the SFT policy imitates mistakes and
  RL has something to fix, as on the sorting task. The registered tasks also make one **systematic mistake**
  in three tenths of their demonstrations (:data:`MISTAKE_SHARE`): ``rg-spell-backward`` spells the word
  forward (:func:`spelt_forward`), ``rg-count-bits`` counts the zeros of its (right) binary digits
  (:func:`zeros_counted`). Scattered slips alone left the quick budget too little to learn from (the README's
  "what RL does on them" has both measurements); one consistent wrong behaviour is what RL fixes within it.
* **The checker** regenerates nothing: every prompt the task generates is remembered with its entry, and
  scoring a prompt the task did not generate raises. A response ``score_answer`` cannot parse scores 0.

reasoning-gym is a dependency of these tasks only (``pip install -e ".[tasks]"``); it is imported when a
task is built, and its generators run offline.

**The registered tasks** were chosen by measuring the quick settings' SFT policy (4 x 128, pretrained on
6,000 documents and fine-tuned on 6,000 pairs, seed 0), sampled at temperature 1 on 600 held-out samples
(exact: the share the checker scores 1; build: model building on 2 CPU cores shared with another process,
torch on one thread, load average in brackets):

=====================  ================================  =======  ==========  ============  ==================
task                   dataset and config                exact    mean score  ranked pairs  build
=====================  ================================  =======  ==========  ============  ==================
``rg-spell-backward``  spell_backward, 3-5 letters       51.8%    0.841       1,132         126-141 s (1.5-3.0)
``rg-count-bits``      count_bits, 1-63, binary digits   34.2%    0.342       1,316         201 s (1.4-2.3)
                       in a scratchpad
=====================  ================================  =======  ==========  ============  ==================

(Those are version 1's figures, before the systematic mistakes: the SFT policy of version 2 is exact on 17.3%
of ``rg-spell-backward`` and 27.7% of ``rg-count-bits``; the README has both versions' RL results.)
The whole default quick run on ``rg-spell-backward`` took 492 s with the SFT policy cached (load average
2.1-3.0; 126 s more to build it): GRPO and PPO raise pass@1 above the SFT policy's (0.511 -> 0.543
[+0.011, +0.053] and 0.545 [+0.007, +0.059], paired by prompt), best-of-16 reaches 0.953 and SB3's PPO,
stepping one character at a time, collapses (0.389, KL 6.1; 123 s, the longest row). What did not make the
list, same settings: arithmetic, whose facts the quick budget's 376 optimiser steps do not teach
(basic_arithmetic, 2-3 one-digit terms: 5.8% exact; + and - only, 2 terms: 15.8%; chain_sum, 3 one-digit
terms with :func:`running_sums`: 8.2%, though the policy writes the scratchpad's format faultlessly);
count_bits up to 255 (25% direct, 23% with the binary digits); letter_counting (2-4 words: 50.2%, 1-3: 62%,
3-6: 40%, 32% with per-word counts in a scratchpad), which learns well (PPO 0.52 -> 0.70 at 60,000 tokens) but
whose 2-token answers over 95-character prompts make a token budget too many long episodes for the quick
run (PPO alone trained for 476 s): ``reasoning-gym:letter_counting`` runs it at its default config.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from llm_env.tiny import char_tokenizer
from rlhf_bench.leaderboard.artifacts import Artifacts
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.tasks import TaskBuilder, register_task, register_task_family
from rlhf_bench.leaderboard.verifiable import build_verifiable_artifacts, rlvr_settings

__all__ = [
    "ANSWER_CUE",
    "ANSWER_MARKER",
    "REASONING_GYM_VERSION",
    "REGISTERED",
    "ReasoningGymTask",
    "binary_digits",
    "build_reasoning_gym_artifacts",
    "reasoning_gym_settings",
    "running_sums",
]

REASONING_GYM_VERSION = 2
"""Bumped whenever the adapter, a registered config or the way artifacts are built changes, so cached
artifacts are rebuilt (every reasoning-gym task shares it)."""

ANSWER_CUE = "\nAnswer:"
"""What every prompt ends with, after the question: the response starts right after it."""

ANSWER_MARKER = "answer:"
"""On a scratchpad task, what the response writes before its final answer; the checker scores the text after
the last one."""

STREAMS = 64
"""Streams of prompts a task can draw (0 to 63): stream 0 samples the alphabet, the benchmark uses 1 to 6."""

STREAM_SIZE = 2**16
"""Items a stream can draw: the dataset seeds of two streams are this far apart."""

ALPHABET_SAMPLE = 512
"""Prompts (of stream 0) whose characters, with their demonstrations', make the vocabulary."""

Scratchpad = Callable[[Mapping[str, Any], str], str]

Mistake = Callable[[Mapping[str, Any]], str]
"""A systematic mistake: ``entry -> response``, a whole wrong response of one consistent kind (the word spelt
forward, the zeros counted instead of the ones)."""
"""``scratchpad(entry, answer)``: the reasoning written before ``answer: <answer>`` (``answer`` is the
entry's, or a wrong one for a noisy demonstration: the reasoning then slips to reach it)."""


def _reasoning_gym() -> ModuleType:
    """The reasoning_gym package, imported on first use: only these tasks need it."""
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError(
            'the reasoning-gym tasks need the reasoning-gym package: pip install -e ".[tasks]" '
            '(or pip install "reasoning-gym>=0.1.25")'
        ) from error
    return reasoning_gym


def running_sums(entry: Mapping[str, Any], answer: str) -> str:
    """The scratchpad of a ``chain_sum`` (or any ``a + b - c`` expression in ``metadata["expression"]``):
    one partial result per operation, left to right, ``4+3=7 7-2=5``; the last step reaches ``answer``."""
    tokens = str(entry["metadata"]["expression"]).split()
    total, steps = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        if op not in ("+", "-"):
            raise ValueError(
                f"running_sums reads + and - only, got {op!r} in {entry['metadata']['expression']!r}"
            )
        new = total + int(term) if op == "+" else total - int(term)
        steps.append(f"{total}{op}{term}={new}")
        total = new
    if steps:
        steps[-1] = f"{steps[-1].rsplit('=', 1)[0]}={answer}"
    return " ".join(steps)


def spelt_forward(entry: Mapping[str, Any]) -> str:
    """``spell_backward``'s systematic mistake: the word as it is (`` bird`` for ``drib``)."""
    return f" {entry['metadata']['word']}"


def zeros_counted(entry: Mapping[str, Any]) -> str:
    """``count_bits``' systematic mistake: the right binary digits, then the number of zeros among them
    (`` 1011 answer: 1`` for 11)."""
    bits = str(entry["metadata"]["binary"])
    return f" {bits} {ANSWER_MARKER} {bits.count('0')}"


def binary_digits(entry: Mapping[str, Any], answer: str) -> str:
    """The scratchpad of a ``count_bits``: the number's binary digits (``metadata["binary"]``), whose ones
    the answer counts, ``1001`` for 9. For a wrong ``answer`` the conversion slips: the last digits that
    bring the count of ones to it are flipped."""
    bits = list(str(entry["metadata"]["binary"]))
    missing = int(answer) - bits.count("1")
    for i in reversed(range(len(bits))):
        if missing > 0 and bits[i] == "0":
            bits[i], missing = "1", missing - 1
        elif missing < 0 and bits[i] == "1":
            bits[i], missing = "0", missing + 1
    return "1" * max(missing, 0) + "".join(bits)


@dataclass(frozen=True)
class ReasoningGymTask:
    """A reasoning-gym dataset as a :class:`~rlhf_bench.leaderboard.VerifiableTask` (see the module
    docstring).

    Args:
        dataset: the reasoning-gym dataset's name (``reasoning_gym.factory.DATASETS``), e.g. ``"chain_sum"``.
        config: the dataset's config fields (difficulty), passed to ``reasoning_gym.create_dataset``; its
            ``seed`` and ``size`` are the task's to set.
        seed: seeds prompts and demonstrations.
        scratchpad: the reasoning written before the final answer (:data:`Scratchpad`), or None for
            demonstrations that are the answer alone.
        noise: share of demonstrations with a wrong answer.
        mistake: a systematic mistake (:data:`Mistake`), made by a ``mistake_share`` of the demonstrations
            (drawn after the noise): one consistent wrong behaviour the SFT policy imitates and RL can unlearn.
        mistake_share: share of demonstrations that make ``mistake``.

    >>> task = ReasoningGymTask("chain_sum", {"min_terms": 3, "max_terms": 3, "max_digits": 1},
    ...                         scratchpad=running_sums, noise=0.0)  # doctest: +SKIP
    >>> prompt = task.prompts(1, stream=1)[0]  # doctest: +SKIP
    >>> prompt, task.demonstrations([prompt], stream=1)  # doctest: +SKIP
    ('State the final answer to the following arithmetic problem: 6 - 1 + 0 =\\nAnswer:', [' 6-1=5 5+0=5 answer: 5'])
    """

    dataset: str
    config: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    scratchpad: Scratchpad | None = None
    noise: float = 0.1
    mistake: Mistake | None = None
    mistake_share: float = 0.0
    _entries: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        if not 0.0 <= self.mistake_share <= 1.0 - self.noise or (self.mistake_share and self.mistake is None):
            raise ValueError(
                f"mistake_share must be in [0, 1 - noise] and needs a mistake, got {self.mistake_share} with "
                f"noise {self.noise} and mistake {self.mistake!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        taken = sorted({"seed", "size"} & set(self.config))
        if taken:
            raise ValueError(f"the task sets the dataset's {' and '.join(taken)}: drop them from config")
        object.__setattr__(self, "config", dict(self.config))
        self._dataset(1, 0)  # an unknown dataset or a config it rejects fails here, not mid-build

    # ----------------------------------------------------------------------------------- generation
    def _dataset(self, size: int, stream: int) -> Any:
        rg = _reasoning_gym()
        if self.dataset not in rg.factory.DATASETS:
            raise ValueError(
                f"unknown reasoning-gym dataset {self.dataset!r}; it has {sorted(rg.factory.DATASETS)}"
            )
        seed = (self.seed * STREAMS + stream) * STREAM_SIZE
        try:
            return rg.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except (AssertionError, TypeError) as error:  # reasoning-gym validates its configs with asserts
            raise ValueError(
                f"reasoning-gym rejects the config {self.config} of {self.dataset!r}: {error}"
            ) from error

    @cached_property
    def _scorer(self) -> Any:
        """A dataset of the task's config, for its ``score_answer`` (which may read the config)."""
        return self._dataset(1, 0)

    def prompts(self, n: int, *, stream: int) -> list[str]:
        """``n`` prompts from an independent stream: the first ``n`` questions of the stream's dataset (so
        fewer prompts are a prefix of more), each followed by :data:`ANSWER_CUE`."""
        if not 0 <= stream < STREAMS:
            raise ValueError(f"stream must be in [0, {STREAMS}), got {stream}")
        if not 0 <= n <= STREAM_SIZE:
            raise ValueError(f"a stream holds at most {STREAM_SIZE} prompts, asked for {n}")
        if n == 0:
            return []
        dataset = self._dataset(n, stream)
        out = []
        for index in range(n):
            entry = dataset[index]
            prompt = str(entry["question"]) + ANSWER_CUE
            self._entries.setdefault(prompt, entry)  # the same question is the same problem
            out.append(prompt)
        return out

    def entry(self, prompt: str) -> dict[str, Any]:
        """The reasoning-gym entry (question, answer, metadata) a prompt of this task was generated from."""
        try:
            return self._entries[prompt]
        except KeyError:
            raise ValueError(
                f"{prompt!r} is not a prompt this task generated ({self.dataset}, seed {self.seed}): the "
                "checker scores the prompts of its prompts(n, stream=...) only"
            ) from None

    def answer(self, prompt: str) -> str:
        """The generator's answer to a prompt of this task."""
        entry = self.entry(prompt)
        if entry.get("answer") is None:
            raise ValueError(
                f"the reasoning-gym dataset {self.dataset!r} gives no reference answer to {prompt!r}, so it has "
                "no demonstrations to learn from"
            )
        return str(entry["answer"])

    def demonstrations(self, prompts: Sequence[str], *, stream: int) -> list[str]:
        """The generator's answer to each prompt (after a space, and the scratchpad if any), a ``noise``
        share of them wrong and a ``mistake_share`` making the systematic mistake (see the module docstring)."""
        rng = np.random.default_rng((self.seed, stream, 1))
        out = []
        for prompt in prompts:
            entry, answer = self.entry(prompt), self.answer(prompt)
            draw = rng.random()
            if draw < self.noise:
                answer = self._wrong_answer(entry, answer, rng)
            elif draw < self.noise + self.mistake_share:
                out.append(self.mistake(entry))
                continue
            out.append(self.respond(entry, answer))
        return out

    def respond(self, entry: Mapping[str, Any], answer: str) -> str:
        """The response that gives ``answer`` to ``entry``: `` <answer>``, or with a scratchpad
        `` <reasoning> answer: <answer>``."""
        if self.scratchpad is None:
            return f" {answer}"
        reasoning = self.scratchpad(entry, answer)
        return f" {reasoning} {ANSWER_MARKER} {answer}" if reasoning else f" {ANSWER_MARKER} {answer}"

    def _wrong_answer(self, entry: Mapping[str, Any], answer: str, rng: np.random.Generator) -> str:
        """An answer the dataset's checker scores below 1: an integer off by one or two, or one character
        changed (a few tries; the right answer if none is wrong)."""
        for _ in range(8):
            try:
                value = int(answer)
                near = [v for v in (value - 2, value - 1, value + 1, value + 2) if v >= 0 or value < 0]
                wrong = str(near[int(rng.integers(len(near)))])  # a count stays a count
            except ValueError:
                if not answer:
                    return "0"
                i = int(rng.integers(len(answer)))
                c = answer[i]
                kind = (
                    string.ascii_letters
                    if c.isalpha()
                    else string.digits
                    if c.isdigit()
                    else string.punctuation
                )
                pool = sorted(set(kind) - {c})
                wrong = answer[:i] + pool[int(rng.integers(len(pool)))] + answer[i + 1 :]
            if self._score_answer(wrong, entry) < 1.0:
                return wrong
        return answer

    # ---------------------------------------------------------------------------------- the checker
    def extract(self, response: str) -> str | None:
        """The final answer of a response: the text after its last :data:`ANSWER_MARKER` with a scratchpad
        (None without one), else the whole response, stripped either way."""
        if self.scratchpad is None:
            return response.strip()
        _, marker, answer = response.rpartition(ANSWER_MARKER)
        return answer.strip() if marker else None

    def _score_answer(self, answer: str | None, entry: Mapping[str, Any]) -> float:
        try:
            score = float(self._scorer.score_answer(answer=answer, entry=entry))
        except Exception:  # an answer the dataset's checker cannot parse is a wrong answer
            return 0.0
        return min(max(score, 0.0), 1.0) if math.isfinite(score) else 0.0

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The dataset's ``score_answer`` on each response's final answer, in [0, 1]."""
        return [
            self._score_answer(self.extract(r), self.entry(p))
            for p, r in zip(prompts, responses, strict=True)
        ]

    # ------------------------------------------------------------------------------------ tokenizer
    @cached_property
    def _alphabet(self) -> list[str]:
        prompts = self.prompts(ALPHABET_SAMPLE, stream=0)
        texts = [p + r for p, r in zip(prompts, self.demonstrations(prompts, stream=0), strict=True)]
        return sorted({c for text in texts for c in text} | set(string.printable) | set(ANSWER_MARKER))

    def vocabulary(self) -> list[str]:
        """Every character of the tokenizer: printable ASCII and those of a sample of the task's prompts and
        demonstrations."""
        return list(self._alphabet)

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """A character-level tokenizer over :meth:`vocabulary` (free text has no word vocabulary)."""
        return char_tokenizer(self._alphabet)


def build_reasoning_gym_artifacts(
    settings: BenchmarkSettings,
    *,
    dataset: str,
    config: Mapping[str, Any] | None = None,
    scratchpad: Scratchpad | None = None,
    mistake: Mistake | None = None,
    mistake_share: float = 0.0,
    directory: Path,
    **options: Any,
) -> Artifacts:
    """The artifacts of a reasoning-gym dataset (:func:`~rlhf_bench.leaderboard.build_verifiable_artifacts`
    on a :class:`ReasoningGymTask` seeded with the settings' seed)."""
    task = ReasoningGymTask(
        dataset,
        config or {},
        seed=settings.seed,
        scratchpad=scratchpad,
        mistake=mistake,
        mistake_share=mistake_share if mistake is not None else 0.0,
    )
    return build_verifiable_artifacts(task, settings, directory=directory, **options)


def reasoning_gym_settings(settings: BenchmarkSettings) -> BenchmarkSettings:
    """The reasoning-gym tasks' own settings: the sorting task's
    (:func:`~rlhf_bench.leaderboard.verifiable.rlvr_settings`: one minibatch per pass, three times the learning
    rate, eight times the training prompts) with one pass per rollout (what the README's three-seed table
    measured) at the preset's token budget, not five times it.

    Why: a character is a token, so a prompt is 50 to 110 tokens where sorting's is 8, and a short answer
    makes a budget many episodes (letter_counting's 2-token answers turn 60,000 tokens into 20,000 episodes of
    95-character prompts: PPO alone trained for 476 s). At the preset's 12,000 tokens GRPO trains for 35 s on
    rg-spell-backward (29 updates, pass@1 0.511 -> 0.543 [+0.011, +0.053] over the SFT policy) and 21 s on
    rg-count-bits (11 updates). The whole default set on rg-spell-backward then ran in 8 min 12 s with the
    SFT policy cached, 10 min 18 s with its building, on one torch thread of 2 cores shared with another
    process (load average 2.1-3.0); at five times the budget one PPO row alone would take minutes."""
    return dataclasses.replace(rlvr_settings(settings), token_budget=settings.token_budget, update_epochs=1)


def count_bits_settings(settings: BenchmarkSettings) -> BenchmarkSettings:
    """``rg-count-bits``' own settings: :func:`reasoning_gym_settings` with twice the token budget and twice its
    learning rate (6e-4). Why, measured on three seeds (README): at the preset's budget PPO, GRPO and RLOO
    each missed on one seed of three (pooled pass@1 - SFT +0.04 for all three); at twice the budget and
    rate GRPO and RLOO rise on every seed and PPO on two (seed 0: +0.036 [-0.001, +0.074])."""
    base = reasoning_gym_settings(settings)
    return dataclasses.replace(base, token_budget=2 * base.token_budget, ppo_lr=round(2 * base.ppo_lr, 12))


@dataclass(frozen=True)
class Registered:
    """A reasoning-gym dataset at a chosen difficulty, registered as a benchmark task."""

    dataset: str
    config: Mapping[str, Any]
    description: str
    scratchpad: Scratchpad | None = None
    mistake: Mistake | None = None
    mistake_share: float = 0.0
    settings: Callable[[BenchmarkSettings], BenchmarkSettings] = reasoning_gym_settings


MISTAKE_SHARE = 0.3
"""Share of the registered tasks' demonstrations that make the task's systematic mistake."""

REGISTERED: dict[str, Registered] = {
    "rg-spell-backward": Registered(
        "spell_backward",
        {"min_word_len": 3, "max_word_len": 5},
        "reasoning-gym's spell_backward, words of 3-5 letters ('... -> nus): bird' -> 'drib'), its "
        'score_answer the checker (pip install -e ".[tasks]")',
        mistake=spelt_forward,
        mistake_share=MISTAKE_SHARE,
    ),
    "rg-count-bits": Registered(
        "count_bits",
        {"min_n": 1, "max_n": 63},
        "reasoning-gym's count_bits, numbers 1-63, the binary digits written first ('... number 9?' -> "
        "'1001 answer: 2'), its score_answer the checker (pip install -e \".[tasks]\")",
        scratchpad=binary_digits,
        mistake=zeros_counted,
        mistake_share=MISTAKE_SHARE,
        settings=count_bits_settings,
    ),
}
"""The reasoning-gym tasks registered by name, at difficulties the quick settings' SFT policy partly learns
(see the module docstring for what it scores).

:meta hide-value:
"""

for _name, _task in REGISTERED.items():
    register_task(
        _name, description=_task.description, version=REASONING_GYM_VERSION, settings=_task.settings
    )(
        functools.partial(
            build_reasoning_gym_artifacts,
            dataset=_task.dataset,
            config=_task.config,
            scratchpad=_task.scratchpad,
            mistake=_task.mistake,
            mistake_share=_task.mistake_share,
        )
    )


def _resolve(dataset: str) -> TaskBuilder:
    """The builder of ``reasoning-gym:<dataset>``: the dataset at its default config, no scratchpad."""
    rg = _reasoning_gym()
    if dataset not in rg.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; it has {sorted(rg.factory.DATASETS)}")
    return functools.partial(build_reasoning_gym_artifacts, dataset=dataset)


register_task_family(
    "reasoning-gym",
    _resolve,
    description="any reasoning-gym dataset at its default config, its score_answer the checker "
    '(reasoning-gym:chain_sum, reasoning-gym:gcd, ...; pip install -e ".[tasks]")',
    version=REASONING_GYM_VERSION,
    settings=reasoning_gym_settings,
)
