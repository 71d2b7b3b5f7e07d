"""Tasks with a verifiable reward: a checker scores answers exactly, no reward model, no proxy gap.

On the review task the agents optimise proxy reward models and a gold rater scores them: the gap between
the two is what over-optimisation exploits (Gao et al. 2022). On a verifiable task (arithmetic, a string
transformation, unit tests; "RL with verifiable rewards", Lambert et al. 2024, DeepSeek-R1 2025) a program
checks each answer, and the same checker is both the reward the agents optimise and the gold that scores
them: what remains to compare is how fast and how far each algorithm climbs, and at what KL.

:func:`build_verifiable_artifacts` turns any :class:`VerifiableTask` (a seeded prompt generator, SFT
demonstrations and a checker) into the benchmark's artifacts, in stages that each log one line:

1. a word-level tokenizer over the task's vocabulary, or the task's own (:func:`task_tokenizer`: a task
   whose text is free, like reasoning-gym's questions, brings a character-level one);
2. the SFT policy (:func:`~rlhf_bench.leaderboard.artifacts.train_sft_policy`): GPT-2-shaped, of the
   settings' size, pretrained on ``pretrain_texts`` prompt-and-demonstration documents and fine-tuned on
   ``sft_pairs`` (prompt, demonstration) pairs; its context is 128 positions, or more when the task's
   longest prompt and the response budget (or its longest document) need them (:func:`context_length`);
3. its score on ``rm_eval_prompts`` held-out prompts (two samples each, temperature 1): the mean checker
   score and the share of correct answers (score 1), so a build says how much room RL has;
4. preference data for the offline DPO row: two pairs of SFT samples for each of ``rm_prompts`` prompts
   (``pairs_per_prompt``), ranked by the checker *noiselessly* (no annotator noise: the checker is exact);
   pairs the checker scores equally carry no preference and are dropped (counted in the metrics).

Everything is cached in the task's directory (:func:`~rlhf_bench.leaderboard.artifacts.cached_build`).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

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
    "context_length",
    "rlvr_settings",
    "task_tokenizer",
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

    A task may also define ``tokenizer() -> PreTrainedTokenizerBase``, the tokenizer its policy reads and
    writes with (decoding a prefix of the ids must give a prefix of the text, which the environment cuts the
    responses with); without it the policy gets a word-level tokenizer over :meth:`vocabulary`
    (:func:`task_tokenizer`).
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


def rlvr_settings(settings: BenchmarkSettings) -> BenchmarkSettings:
    """The built-in verifiable tasks' own settings (sorting's, the registered reasoning-gym tasks'), from the
    preset's (:attr:`~rlhf_bench.leaderboard.tasks.TaskEntry.settings`):
    one pass of one minibatch per rollout (an on-policy step), three times the learning rate, five times the
    token budget and eight times the training prompts.

    Why, measured on sorting (the README's "Why RL did not learn sorting" has the measurements): its answers
    are 5 tokens, so the preset's four passes of four minibatches of 16 episodes make 16 Adam steps per 64-episode rollout, each on
    two prompts' groups, and the steps mostly follow that noise: GRPO's KL rose from 0.29 to 0.44 in 100
    updates while the held-out score crept from 0.82 to 0.85, and at 3e-4 the same shape fell below the SFT
    policy. With one step per rollout at 3e-4 the held-out pass@1 climbs (GRPO 0.56 -> 0.67-0.70 in 100
    updates, KL 0.26-0.30). Two passes were measured too, on three seeds: pass@1 - SFT pooled GRPO +0.055,
    RLOO +0.066, PPO +0.063 against one pass's +0.105, +0.106 and +0.060, at a higher KL (0.54-0.70 against
    0.37-0.48). Five times the budget (about 170 updates) is what the quick run can afford with one step per
    update; eight times the prompts keeps PPO
    from memorising the 512 of the preset (training score 0.87, held-out 0.80, after 40 of its updates).

    No beta sweep (``sweep_kl_coefs=()``): the sweep's low-beta PPO rows show over-optimisation, the gold
    falling while the proxy rises (Gao et al. 2022), which needs a proxy that differs from the gold. Here
    the checker is both, so the row only repeated PPO at another KL, at the cost of a PPO run and its
    evaluations (about 70 s of rg-count-bits' quick run)."""
    return dataclasses.replace(
        settings,
        sweep_kl_coefs=(),
        update_epochs=1,
        minibatches=1,
        ppo_lr=round(3 * settings.ppo_lr, 12),
        token_budget=5 * settings.token_budget,
        train_prompts=8 * settings.train_prompts,
    )


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


def task_tokenizer(task: VerifiableTask) -> PreTrainedTokenizerBase:
    """The task's own ``tokenizer()`` when it defines one, else a word-level tokenizer over its
    ``vocabulary()`` (the built-in sorting task's)."""
    make = getattr(task, "tokenizer", None)
    if make is None:
        return word_tokenizer([" ".join(task.vocabulary())])
    if not callable(make):
        raise TypeError(
            f"{type(task).__name__}.tokenizer must be a method returning a tokenizer, got {make!r}"
        )
    return make()


def context_length(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    documents: Sequence[str],
    max_new_tokens: int,
    *,
    minimum: int = 128,
) -> int:
    """Positions the policy needs: ``minimum`` (the built-in tasks' context), or, when the longest prompt
    plus ``max_new_tokens`` or the longest training document with its end-of-sequence token is longer, that
    length rounded up to a multiple of 64."""

    def longest(texts: Sequence[str]) -> int:
        return max(map(len, tokenizer(list(texts))["input_ids"])) if texts else 0

    needed = max(longest(prompts) + max_new_tokens, longest(documents) + 1)
    return minimum if needed <= minimum else -(-needed // 64) * 64


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
        tokenizer = task_tokenizer(task)
        prompts = task.prompts(settings.pretrain_texts, stream=1)
        documents = [p + r for p, r in zip(prompts, task.demonstrations(prompts, stream=1), strict=True)]
        prompts = task.prompts(settings.sft_pairs, stream=2)
        pairs = list(zip(prompts, task.demonstrations(prompts, stream=2), strict=True))
        every_prompt = [  # each prompt the policy will see, held-out and training ones included
            *task.prompts(settings.rm_prompts, stream=3),
            *task.prompts(settings.rm_eval_prompts, stream=4),
            *task.prompts(settings.train_prompts, stream=5),
            *task.prompts(settings.eval_prompts, stream=6),
        ]
        positions = context_length(
            tokenizer, every_prompt, [*documents, *(p + r for p, r in pairs)], settings.max_new_tokens
        )
        answers = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        too_long = sum(len(ids) + 1 > settings.max_new_tokens for ids in answers)  # + the end-of-sequence
        if too_long:
            log(
                f"{too_long} of {len(pairs)} demonstrations do not fit in max_new_tokens="
                f"{settings.max_new_tokens} with their end-of-sequence token: the policy's answers are cut "
                "there (raise max_new_tokens)"
            )
        policy, metrics = train_sft_policy(
            tokenizer,
            documents,
            pairs,
            settings,
            device=device,
            log=log,
            progress=progress,
            what="solutions",
            n_positions=positions,
        )
        metrics.update(context_length=positions, demonstrations_too_long=too_long)
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
