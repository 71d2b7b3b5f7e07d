"""ReMax: the greedy response's reward as the baseline (by hand and through the env); it learns the task."""

import numpy as np
import pytest
import torch

from agents.remax import ReMaxAgent, ReMaxConfig, remax_advantages, remax_loss
from agents.rollout import collect_episodes


def test_advantage_is_the_reward_minus_the_greedy_reward():
    rewards = torch.tensor([1.0, 3.0, 0.5, 0.0])
    greedy = torch.tensor([2.0, -1.0])
    assert remax_advantages(rewards, greedy, 2).tolist() == [-1.0, 1.0, 1.5, 1.0]
    with pytest.raises(ValueError, match="greedy baselines"):
        remax_advantages(rewards, greedy, 1)


def test_loss_is_reinforce_on_the_sequence():
    old = torch.zeros(2, 2)
    logprobs = old.clone().requires_grad_(True)
    advantages = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = remax_loss(logprobs, old, advantages, mask)
    assert loss.item() == pytest.approx((-4.0 + 1.0) / 2)
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.0, -1.0], [0.5, 0.0]]


def test_baseline_is_the_greedy_rollout(fresh_policy, gpt2, tokenizer, task_prompts, task_reward):
    config = ReMaxConfig(prompts_per_update=4, kl_coef=0.3, progress=False, seed=0)
    agent = ReMaxAgent(fresh_policy(), tokenizer, config, reference=gpt2)
    env = agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=5)
    batch = agent.rollout(env)
    prompts = batch.prompt_index
    greedy = collect_episodes(env, agent.greedy_sampler, 4, prompt_indices=prompts)
    np.testing.assert_allclose(batch.extras["greedy_returns"], greedy.returns)  # greedy: deterministic
    assert np.isfinite(greedy.kl).all() and np.abs(greedy.kl).max() > 0  # it pays its KL too
    assert batch.extras["sampled_tokens"] == batch.num_tokens + greedy.num_tokens
    np.testing.assert_allclose(agent.advantages(batch).numpy(), batch.returns - greedy.returns, atol=1e-5)
    with pytest.raises(ValueError, match="greedy baseline"):
        agent.advantages(collect_episodes(env, agent, 4, prompt_indices=prompts))


@pytest.mark.slow
def test_remax_raises_the_score(pg_learning_run):
    # one sample per prompt against a greedy baseline: noisier than the group methods, so a larger step
    _, history, start, end = pg_learning_run(
        ReMaxAgent, ReMaxConfig, prompts_per_update=16, group_size=1, learning_rate=2e-2
    )
    assert start < 0.6 and end > start + 1.0, (start, end)
    assert "greedy_score" in history[0]
