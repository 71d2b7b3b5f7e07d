"""The leaderboard's SB3Agent samples exactly the distribution of the Stable-Baselines3 policy it wraps,
through the LM's KV cache instead of SB3's re-encoding of every observation."""

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

import llm_env
from agents.sb3 import LMActorCriticPolicy
from llm_env.tiny import tiny_gpt2, word_tokenizer
from rlhf_bench.leaderboard import SB3Agent

PROMPTS = ["the film was", "a great movie", "i liked the", "this book is"]


def test_sb3_agent_log_probs_are_the_sb3_policy_s(tmp_path):
    tokenizer = word_tokenizer([*PROMPTS, "good bad fine dull plot story music"])
    env = llm_env.TextGenEnv(
        prompts=PROMPTS, tokenizer=tokenizer, reward=lambda p, r: [0.0] * len(r), max_new_tokens=6
    )
    model = PPO(LMActorCriticPolicy, env, policy_kwargs={"model": tiny_gpt2(tokenizer, seed=3)}, n_steps=8)
    agent = SB3Agent(model, seed=0)
    envs = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=PROMPTS,
        tokenizer=tokenizer,
        reward=lambda p, r: [0.0] * len(r),
        reference=tiny_gpt2(tokenizer, seed=1),
        max_new_tokens=6,
    )
    obs, _ = envs.reset(seed=0)
    restarted, done = np.ones(3, dtype=bool), np.zeros(3, dtype=bool)
    checked = restarts = 0
    for _ in range(10):  # past the first episodes' ends: rows that restarted are prefilled again
        actions = agent.act(obs, restarted)
        with torch.no_grad():
            dist = model.policy.get_distribution({k: v.float() for k, v in obs.items()})
        torch.testing.assert_close(actions.logprobs, dist.log_prob(actions.tokens), atol=1e-5, rtol=1e-5)
        checked += 1
        obs, _, terminated, truncated, _ = envs.step(actions)
        # Next-step autoreset: the rows that ended at the previous step were reset by this one.
        restarted, done = done, (terminated | truncated).cpu().numpy()
        restarts += int(restarted.sum())
    assert checked == 10 and restarts > 0


def test_sb3_agent_refuses_another_policy():
    class Model:
        policy = object()

    with pytest.raises(TypeError, match="LMActorCriticPolicy"):
        SB3Agent(Model())
