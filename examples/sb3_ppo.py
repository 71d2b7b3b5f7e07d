"""Train a transformers language model on TextGenEnv with unmodified Stable-Baselines3 PPO.

SB3 sees an ordinary Gymnasium environment (through its own ``DummyVecEnv``) and an ordinary
actor-critic policy class whose trunk and action head are the language model. SB3 does not tell the
environment its log-probabilities, so each token is rewarded with ``kl_coef * log pi_ref(token)`` and
SB3's entropy bonus with ``ent_coef = kl_coef`` supplies the other half of the KL penalty.

    python examples/sb3_ppo.py
"""

from __future__ import annotations

import argparse

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import llm_env
from agents import LMActorCriticPolicy
from llm_env.tiny import tiny_gpt2, word_tokenizer

KL_COEF = 0.01


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10, help="PPO rollouts of n_envs * n_steps tokens")
    args = parser.parse_args()

    prompts = ["the film was", "the story is", "i think the actors", "overall it was"]
    tokenizer = word_tokenizer([*prompts, "good great fun bad dull slow and but the plot music ending"])
    scores: list[float] = []

    def positive_words(prompts: list[str], responses: list[str]) -> list[float]:
        batch = [float(sum(w in {"good", "great", "fun"} for w in r.split())) for r in responses]
        scores.extend(batch)
        return batch

    reference = tiny_gpt2(tokenizer, seed=1)
    envs = make_vec_env(
        lambda: llm_env.TextGenEnv(
            prompts=prompts,
            tokenizer=tokenizer,
            reward=positive_words,
            reference=reference,
            kl_coef=KL_COEF,
            max_new_tokens=6,
        ),
        n_envs=4,
        seed=0,
    )
    model = PPO(
        LMActorCriticPolicy,
        envs,
        policy_kwargs={"model": tiny_gpt2(tokenizer, seed=1)},  # starts as the reference
        n_steps=48,
        batch_size=48,
        n_epochs=4,
        learning_rate=3e-3,
        gamma=1.0,
        ent_coef=KL_COEF,
        seed=0,
        verbose=0,
    )
    for iteration in range(args.iterations):
        start = len(scores)
        model.learn(total_timesteps=48 * 4, reset_num_timesteps=False)
        print(f"iteration {iteration:2d}  mean reward-model score {np.mean(scores[start:]):.2f}")


if __name__ == "__main__":
    main()
