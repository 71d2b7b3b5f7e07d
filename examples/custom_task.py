"""Add your own task to the benchmark: "say a word that rhymes", with a checker for a reward.

A verifiable task is four methods (``rlhf_bench.leaderboard.VerifiableTask``): the words it uses, seeded
prompts, SFT demonstrations and a checker scoring answers in [0, 1]. One registered builder turns it into
the benchmark's artifacts (a tokenizer, a GPT-2-shaped SFT policy pretrained and fine-tuned on the
demonstrations, checker-ranked preference pairs for offline DPO, all cached) and every leaderboard row then
runs on it, with the checker both as the reward the agents optimise and as the gold that scores them.

    python examples/custom_task.py                   # tiny settings, SFT, GRPO and DPO, under a minute
    python examples/custom_task.py --quick --agents default
    llm-env benchmark --task rhymes                  # not from the shell: the task lives in this script

Register tasks at import time (module level, as here), so that ``--nproc`` workers, which import the
script again, find them too.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlhf_bench.leaderboard import (
    Artifacts,
    BenchmarkResult,
    BenchmarkSettings,
    build_verifiable_artifacts,
    register_task,
    run_benchmark,
)

# Words that rhyme by their spelling; the checker accepts any other word of the prompt's family.
FAMILIES = (
    ("cat", "hat", "bat", "mat", "rat", "sat"),
    ("king", "ring", "sing", "wing", "thing"),
    ("cake", "lake", "make", "snake", "take"),
    ("light", "night", "bright", "sight", "right"),
    ("moon", "soon", "spoon", "noon", "tune"),
    ("bear", "chair", "hair", "pair", "fair"),
)
FAMILY = {word: i for i, family in enumerate(FAMILIES) for word in family}


@dataclass(frozen=True)
class RhymeTask:
    """Prompts ``a word that rhymes with cat :``; the answer is one word: `` hat``.

    Args:
        seed: seeds prompts and demonstrations.
        noise: share of demonstrations that answer with a word of another family (the SFT policy imitates
            those mistakes; RL can unlearn them).
    """

    seed: int = 0
    noise: float = 0.2

    def vocabulary(self) -> list[str]:
        return ["a", "word", "that", "rhymes", "with", ":", *FAMILY]

    def prompts(self, n: int, *, stream: int) -> list[str]:
        rng = np.random.default_rng((self.seed, stream))
        words = list(FAMILY)
        return [f"a word that rhymes with {words[i]} :" for i in rng.integers(len(words), size=n)]

    def demonstrations(self, prompts: Sequence[str], *, stream: int) -> list[str]:
        rng = np.random.default_rng((self.seed, stream, 1))
        out = []
        for prompt in prompts:
            word = prompt.split()[-2]
            if rng.random() < self.noise:  # a slip: a word that does not rhyme
                pool = [w for w in FAMILY if FAMILY[w] != FAMILY[word]]
            else:
                pool = [w for w in FAMILIES[FAMILY[word]] if w != word]
            out.append(" " + pool[rng.integers(len(pool))])
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """1 for exactly one word that rhymes with the prompt's (and is not that word), else 0."""
        scores = []
        for prompt, response in zip(prompts, responses, strict=True):
            word, answer = prompt.split()[-2], response.split()
            rhymes = len(answer) == 1 and answer[0] != word and FAMILY.get(answer[0]) == FAMILY[word]
            scores.append(float(rhymes))
        return scores


@register_task("rhymes", description="examples/custom_task.py: say a word that rhymes", version=1)
def rhymes(settings: BenchmarkSettings, **options: Any) -> Artifacts:
    """Bump ``version`` when the task changes: cached artifacts of the old version are then not reused."""
    return build_verifiable_artifacts(RhymeTask(seed=settings.seed), settings, **options)


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick settings instead of the tiny ones")
    parser.add_argument("--agents", default="grpo,dpo", help="leaderboard rows (sft always runs)")
    parser.add_argument("--out", default="runs/custom-task", help="where the leaderboard goes")
    parser.add_argument("--cache-dir", help="artifact cache (default $LLM_ENV_CACHE or ~/.cache/llm_env)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        settings = BenchmarkSettings.quick(seed=args.seed)
    else:  # toy sizes, but a policy wide enough to learn which words rhyme, and a budget to improve it
        settings = BenchmarkSettings.tiny(
            seed=args.seed,
            policy_width=64,
            pretrain_texts=3000,
            sft_pairs=3000,
            token_budget=3000,
            ppo_lr=1e-3,
            eval_prompts=64,
            eval_samples=2,
        )
    return run_benchmark(
        settings,
        task="rhymes",
        agents=args.agents.split(","),
        out_dir=args.out,
        cache_dir=args.cache_dir,
        device="cpu",
        progress=False,
    )


if __name__ == "__main__":
    main()
