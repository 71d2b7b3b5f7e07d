"""Unmodified Stable-Baselines3 PPO trains a transformers LM on TextGenEnv through SB3's own VecEnv."""

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import llm_env
from agents.sb3 import LMActorCriticPolicy
from llm_env.tiny import tiny_gpt2


@pytest.mark.slow
def test_sb3_ppo_raises_the_reward_model_score(tokenizer, task_prompts):
    scores = []

    def reward(prompts, responses):
        batch = [float(r.split().count("good")) for r in responses]
        scores.extend(batch)
        return batch

    reference = tiny_gpt2(tokenizer, seed=2)
    venv = make_vec_env(
        lambda: llm_env.TextGenEnv(
            prompts=task_prompts,
            tokenizer=tokenizer,
            reward=reward,
            reference=reference,
            kl_coef=0.01,
            max_new_tokens=5,
        ),
        n_envs=4,
        seed=0,
    )
    model = PPO(
        LMActorCriticPolicy,
        venv,
        policy_kwargs={"model": tiny_gpt2(tokenizer, seed=2)},
        n_steps=40,
        batch_size=40,
        n_epochs=4,
        learning_rate=3e-3,
        gamma=1.0,
        ent_coef=0.01,  # = kl_coef: the entropy half of the KL penalty (the env pays beta * log pi_ref)
        seed=0,
    )
    model.learn(total_timesteps=40 * 4 * 10)
    n = len(scores)
    first, last = np.mean(scores[: n // 5]), np.mean(scores[-n // 5 :])
    assert last > first + 1.0, (first, last)


def test_initial_sb3_policy_is_the_language_model(tokenizer, task_prompts, task_reward):
    """The action distribution SB3 samples from is exactly the LM's next-token distribution."""
    lm = tiny_gpt2(tokenizer, seed=4)
    env = llm_env.TextGenEnv(prompts=task_prompts, tokenizer=tokenizer, reward=task_reward, max_new_tokens=3)
    model = PPO(LMActorCriticPolicy, env, policy_kwargs={"model": lm}, n_steps=8, batch_size=8)
    obs, _ = env.reset(seed=0)
    obs_t, _ = model.policy.obs_to_tensor(obs)
    with torch.no_grad():
        dist = model.policy.get_distribution(obs_t).distribution.probs[0]
        length = int(obs["attention_mask"].sum())
        expected = lm(torch.as_tensor(obs["input_ids"][:length])[None]).logits[0, -1].softmax(-1)
        values = model.policy.predict_values(obs_t)
    torch.testing.assert_close(dist, expected, atol=1e-5, rtol=1e-5)
    assert values.shape == (1, 1)


def test_sb3_policy_rejects_a_foreign_observation_space(tokenizer):
    import gymnasium as gym

    with pytest.raises(ValueError, match="Dict"):
        LMActorCriticPolicy(
            gym.spaces.Box(0, 1, (4,)), gym.spaces.Discrete(3), lambda _: 1e-3, model=tiny_gpt2(tokenizer)
        )
