"""Tasks with a verifiable reward: a checker scores answers exactly, no reward model, no proxy gap.

On the review task the agents optimise proxy reward models and a gold rater scores them: the gap between
the two is what over-optimisation exploits (Gao et al. 2022). On a verifiable task (arithmetic, a string
transformation, unit tests; "RL with verifiable rewards", Lambert et al. 2024, DeepSeek-R1 2025) a program
checks each answer, and the same checker is both the reward the agents optimise and the gold that scores
them: what remains to compare is how fast and how far each algorithm climbs, and at what KL.

:func:`build_verifiable_artifacts` turns any :class:`VerifiableTask` (a seeded prompt generator, SFT
demonstrations and a checker) into the benchmark's artifacts, in stages that each log one line:

1. a word-level tokenizer over the task's vocabulary;
2. the SFT policy (:func:`~rlhf_bench.leaderboard.artifacts.train_sft_policy`): GPT-2-shaped, of the
   settings' size, pretrained on ``pretrain_texts`` prompt-and-demonstration documents and fine-tuned on
   ``sft_pairs`` (prompt, demonstration) pairs;
3. its score on ``rm_eval_prompts`` held-out prompts (two samples each, temperature 1): the mean checker
   score and the share of correct answers (score 1), so a build says how much room RL has;
4. preference data for the offline DPO row: two pairs of SFT samples for each of ``rm_prompts`` prompts
   (``pairs_per_prompt``), ranked by the checker *noiselessly* (no annotator noise: the checker is exact);
   pairs the checker scores equally carry no preference and are dropped (counted in the metrics).

Everything is cached in the task's directory (:func:`~rlhf_bench.leaderboard.artifacts.cached_build`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from llm_env.models import load_tokenizer
from llm_env.reward import check_scores
from llm_env.tiny import word_tokenizer
from rewards import Comparison, save_preferences, simulate_preferences
from rlhf_bench.leaderboard.artifacts import Artifacts, cached_build, sample_texts, train_sft_policy
from rlhf_bench.leaderboard.settings import BenchmarkSettings

__all__ = [
    "CHECKER_LEVELS",
    "VerifiableTask",
    "as_checker",
    "build_verifiable_artifacts",
    "checker_preferences",
]

Log = Callable[[str], None]

PREFERENCE_FILE = "preferences.jsonl"
"""The checker-ranked pairs of SFT samples, in the task's directory."""

CHECKER_LEVELS = (0.75, 0.5, 0.25)
"""Score gaps at which a checker-ranked pair is labelled significantly better, better, slightly better
(below: negligibly better): Llama 2's four levels on the checker's [0, 1] scale. DPO ignores them; a reward
model trained on the file would use them as margins."""


@runtime_checkable
class VerifiableTask(Protocol):
    """What a verifiable task provides. Every random draw must come from the task's seed and ``stream``.

    Responses are what the environment decodes after the prompt: they start with a space (the word-level
    tokenizer joins words with single spaces), and so must the demonstrations.
    """

    def vocabulary(self) -> list[str]:
        """Every word prompts and answers use (the word-level tokenizer's vocabulary)."""
        ...

    def prompts(self, n: int, *, stream: int) -> list[str]:
        """``n`` prompts from an independent stream (different streams never share their draws)."""
        ...

    def demonstrations(self, prompts: Sequence[str], *, stream: int) -> list[str]:
        """One SFT answer per prompt (mostly correct; a few mistakes leave the SFT policy room to improve)."""
        ...

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The checker: a score in [0, 1] per response, 1 exactly for a correct answer."""
        ...


def as_checker(task: VerifiableTask) -> Callable[[Sequence[str], Sequence[str]], list[float]]:
    """``task.score`` as the benchmark's reward and gold, validated on every call: one finite number per
    response, in [0, 1] (else a ValueError names the range it got)."""
    if not isinstance(task, VerifiableTask):
        raise TypeError(
            f"{type(task).__name__} is not a VerifiableTask: it needs vocabulary(), prompts(n, stream=...), "
            "demonstrations(prompts, stream=...) and score(prompts, responses)"
        )

    def checker(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        raw = task.score(prompts, responses)
        check_scores(raw, len(responses), "the task's checker")  # numbers, one per response, finite
        scores = np.asarray(raw, dtype=np.float64)
        if scores.size and not ((scores >= 0) & (scores <= 1)).all():
            raise ValueError(
                f"the task's checker must score in [0, 1], got values from {scores.min():.3f} to {scores.max():.3f}"
            )
        return scores.tolist()

    return checker


def checker_preferences(
    prompts: Sequence[str],
    sample_fn: Callable[[list[str], int], Sequence[Sequence[str]]],
    checker: Callable[[Sequence[str], Sequence[str]], Sequence[float]],
    *,
    pairs_per_prompt: int,
    seed: int,
) -> tuple[list[Comparison], int]:
    """Pairs of sampled responses ranked by ``checker``, higher score chosen, and how many tied pairs were
    dropped (a tie says nothing about which answer is better). Identical or empty pairs are dropped too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical sample pairs are dropped: they tie, and are counted below
        pairs = simulate_preferences(
            prompts,
            sample_fn,
            checker,
            pairs_per_prompt=pairs_per_prompt,
            temperature=0.0,  # the noiseless annotator: the higher checker score always wins
            level_thresholds=CHECKER_LEVELS,
            seed=seed,
        )
    ranked = [c for c in pairs if c.gold is not None and c.gold[0] != c.gold[1]]
    return ranked, len(prompts) * pairs_per_prompt - len(ranked)


def build_verifiable_artifacts(
    task: VerifiableTask,
    settings: BenchmarkSettings,
    *,
    directory: Path,
    device: torch.device | str = "cpu",
    rebuild: bool = False,
    log: Log = print,
    progress: bool = True,
) -> Artifacts:
    """The artifacts of a verifiable ``task`` in ``directory`` (see the module docstring): the checker is
    both ``reward`` and ``gold``. Call it from a builder registered with
    :func:`~rlhf_bench.leaderboard.tasks.register_task`."""
    checker = as_checker(task)

    def build(tmp: Path) -> dict[str, Any]:
        tokenizer = word_tokenizer([" ".join(task.vocabulary())])
        prompts = task.prompts(settings.pretrain_texts, stream=1)
        documents = [p + r for p, r in zip(prompts, task.demonstrations(prompts, stream=1), strict=True)]
        prompts = task.prompts(settings.sft_pairs, stream=2)
        pairs = list(zip(prompts, task.demonstrations(prompts, stream=2), strict=True))
        policy, metrics = train_sft_policy(
            tokenizer, documents, pairs, settings, device=device, log=log, progress=progress, what="solutions"
        )
        policy.save_pretrained(tmp / "sft")
        tokenizer.save_pretrained(tmp / "sft")

        def sample_fn(ps: list[str], k: int) -> list[list[str]]:
            return sample_texts(
                policy,
                tokenizer,
                ps,
                k,
                max_new_tokens=settings.max_new_tokens,
                num_envs=settings.num_envs,
                device=device,
                seed=settings.seed * 1000 + 3,
            )

        start = time.perf_counter()
        held_out = task.prompts(settings.rm_eval_prompts, stream=4)
        samples = sample_fn(held_out, 2)
        flat = [(p, r) for p, rs in zip(held_out, samples, strict=True) for r in rs]
        scores = np.asarray(checker([p for p, _ in flat], [r for _, r in flat]))
        metrics.update(sft_score=float(scores.mean()), sft_solved=float(np.mean(scores == 1.0)))
        ranked, ties = checker_preferences(
            task.prompts(settings.rm_prompts, stream=3),
            sample_fn,
            checker,
            pairs_per_prompt=settings.pairs_per_prompt,
            seed=settings.seed + 10,
        )
        if not ranked:
            raise ValueError(
                f"the checker scored both SFT samples of all {settings.rm_prompts * settings.pairs_per_prompt} "
                "pairs equally: no preference data for the dpo row (is the task too easy or too hard for the "
                "SFT policy?)"
            )
        save_preferences(ranked, tmp / PREFERENCE_FILE)
        metrics.update(preference_pairs=len(ranked), tied_pairs=ties)
        log(
            f"the SFT policy scores {metrics['sft_score']:.3f} on {len(flat)} held-out samples "
            f"({metrics['sft_solved']:.1%} correct); ranked {len(ranked)} pairs of its samples with the "
            f"checker, dropped {ties} ties ({time.perf_counter() - start:.0f}s)"
        )
        return metrics

    metrics = cached_build(
        directory, build, settings=settings, rebuild=rebuild, log=log, what="SFT policy and preference data"
    )
    return Artifacts(
        policy_path=str(directory / "sft"),
        reference_path=str(directory / "sft"),
        tokenizer=load_tokenizer(directory / "sft"),
        reward=checker,
        gold=checker,
        train_prompts=task.prompts(settings.train_prompts, stream=5),
        eval_prompts=task.prompts(settings.eval_prompts, stream=6),
        metrics=metrics,
        directory=directory,
        task=task,
        preference_files=[directory / PREFERENCE_FILE],
        verifiable=True,
    )
