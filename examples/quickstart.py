"""Step TextGenVectorEnv with a random agent and print an episode's text, reward-model score and KL.

Runs offline in seconds: it builds a tiny word-level tokenizer and a GPT-2-shaped reference model, saves
them with ``save_pretrained`` and loads them back by path, exactly as a real checkpoint would be loaded.
Pass ``--reference PATH_OR_HUB_NAME`` to use a real model instead (``--device cuda`` on a GPU).

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import math
import tempfile

import torch

import llm_env
from llm_env.tiny import tiny_gpt2, word_tokenizer

PROMPTS = [
    "the film was",
    "i think the story",
    "the actors in this movie",
    "overall the music was",
]


def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
    """A stand-in reward model: +1 per positive word, -1 per negative word in the response."""
    positive, negative = {"good", "great", "fun", "fine"}, {"bad", "dull", "weak", "slow"}
    return [float(sum((w in positive) - (w in negative) for w in r.split())) for r in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", help="causal LM path or hub name (default: a tiny GPT-2 built here)")
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        reference = args.reference
        if reference is None:
            corpus = [*PROMPTS, "good great fun fine bad dull weak slow and but the plot was a movie"]
            tokenizer = word_tokenizer(corpus)
            tiny_gpt2(tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            reference = tmp

        envs = llm_env.TextGenVectorEnv(
            num_envs=args.num_envs,
            prompts=PROMPTS,
            reference=reference,  # the tokenizer is loaded from the same path
            reward=sentiment,
            kl_coef=0.05,
            max_new_tokens=args.max_new_tokens,
            device=args.device,
        )
        vocab = envs.single_action_space.n
        generator = torch.Generator(device=envs.device).manual_seed(args.seed)
        obs, info = envs.reset(seed=args.seed)
        for _ in range(args.max_new_tokens + 1):
            # A random agent: uniform tokens, and it reports their log-probability, -log V, so the
            # environment can compute the exact per-token KL penalty.
            tokens = torch.randint(0, vocab, (args.num_envs,), generator=generator, device=envs.device)
            logprobs = torch.full((args.num_envs,), -math.log(vocab), device=envs.device)
            obs, rewards, terminations, truncations, info = envs.step(llm_env.TokenActions(tokens, logprobs))
            if "completion" in info:
                done = info["_completion"].nonzero()[0]
                c = {key: value[done[0]] for key, value in info["completion"].items()}
                print(f"prompt:   {c['prompt']!r}")
                print(f"response: {c['response']!r}")
                print(
                    f"score: {c['score']:+.3f}   KL: {c['kl']:.3f}   return: {c['return']:+.3f}   tokens: {c['length']}"
                )
                break
        envs.close()


if __name__ == "__main__":
    main()
