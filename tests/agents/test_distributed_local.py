"""What data parallelism changed in one process: the minibatch loss is normalised by its token count, so
gradient accumulation is exact (the mean of micro-batch means it replaced was not, with unequal lengths)."""

from __future__ import annotations

import torch
from gymnasium.vector import AutoresetMode

from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import collect_episodes


def test_gradient_accumulation_gives_the_minibatch_gradient(
    fresh_policy, tokenizer, task_prompts, task_reward
):
    config = dict(learning_rate=1e-3, episodes_per_update=8, minibatch_size=8, ppo_epochs=2, progress=False)
    collector = PPOAgent(fresh_policy(), tokenizer, PPOConfig(**config))
    env = collector.make_env(
        task_prompts, task_reward, num_envs=4, max_new_tokens=6, autoreset_mode=AutoresetMode.DISABLED
    )
    episodes = collect_episodes(env, collector, 8, seed=0)
    assert (
        len(set(episodes.lengths.tolist())) > 1
    )  # unequal lengths: a mean of micro-batch means would differ
    agents = {}
    for steps in (1, 4):
        agents[steps] = PPOAgent(
            fresh_policy(), tokenizer, PPOConfig(**config, gradient_accumulation_steps=steps)
        )
        agents[steps].learn(episodes)
    for (name, a), b in zip(agents[1].policy.named_parameters(), agents[4].policy.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
