"""What data parallelism changed in one process: the minibatch loss is normalised by its token count, so
gradient accumulation is exact (the mean of micro-batch means it replaced was not, with unequal lengths); the
world-size checks of every agent; rows that only join the collectives carry no loss."""

from __future__ import annotations

import math

import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.dpo import DPOConfig
from agents.grpo import GRPOAgent, GRPOConfig
from agents.online_dpo import OnlineDPOConfig
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


def test_world_size_errors_of_the_critic_free_and_dpo_agents_name_the_numbers():
    """What ``torchrun --nproc-per-node 2`` refuses before any work (the agents call these in their
    constructors, tested on 2 ranks in test_distributed_pg.py and test_distributed_dpo.py)."""
    GRPOConfig(
        prompts_per_update=4, group_size=2, minibatch_size=4, gradient_accumulation_steps=2
    ).check_world_size(2)
    with pytest.raises(ValueError, match="prompts_per_update=3 is not divisible by the world size 2"):
        GRPOConfig(prompts_per_update=3, group_size=2).check_world_size(2)
    with pytest.raises(ValueError, match="minibatch_size=3 is not divisible by the world size 2"):
        GRPOConfig(prompts_per_update=6, group_size=2, minibatch_size=3).check_world_size(2)
    with pytest.raises(
        ValueError, match=r"gradient_accumulation_steps \(8\) must divide the per-rank minibatch 8 / world"
    ):
        GRPOConfig(prompts_per_update=4, group_size=2, gradient_accumulation_steps=8).check_world_size(2)
    with pytest.raises(ValueError, match="batch_size=1 pairs cannot give each of the 2 ranks a pair"):
        DPOConfig(batch_size=1).check_world_size(2)
    with pytest.raises(ValueError, match="prompts_per_update=3 is not divisible by the world size 2"):
        OnlineDPOConfig(prompts_per_update=3, minibatch_size=1).check_world_size(2)


def test_padding_rows_carry_no_loss(fresh_policy, tokenizer, task_prompts, task_reward):
    """A rank whose episodes are all padding (DAPO that found no informative group while other ranks did)
    only joins the collectives: in one process its update leaves the policy as it is and logs no episode."""
    agent = GRPOAgent(
        fresh_policy(), tokenizer, GRPOConfig(prompts_per_update=2, group_size=2, progress=False)
    )
    trajectories = agent.rollout(agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=4))
    trajectories.extras["padding"] = True
    before = [p.detach().clone() for p in agent.policy.parameters()]
    stats = agent.learn(trajectories)
    assert all(torch.equal(a, b) for a, b in zip(before, agent.policy.parameters()))
    assert stats["grad_norm"] == 0.0 and stats["policy_loss"] == 0.0 and math.isnan(stats["kl"])
