"""DAPO: clip-higher, token-level aggregation, overlong shaping and dynamic sampling; it learns the tiny task."""

import numpy as np
import pytest
import torch

from agents.dapo import (
    DAPOAgent,
    DAPOConfig,
    check_overlong_buffer,
    dapo_loss,
    informative_groups,
    overlong_penalty,
)


def test_loss_is_clipped_higher_and_averaged_over_tokens():
    # response 1: ratios 1.25 and 1.5 with A = +1; response 2 (1 token): ratio 0.5 with A = -1
    old = torch.zeros(2, 2)
    logprobs = torch.log(torch.tensor([[1.25, 1.5], [0.5, 1.0]]))
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = dapo_loss(logprobs, old, advantages, mask)
    # per token: -1.25 (below 1 + 0.28, not clipped), -min(1.5, 1.28) = -1.28, -min(-0.5, -0.8) = 0.8
    assert float(loss) == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 7, 9, 10, 12])
    # L_max 10, L_cache 4: no penalty up to 6, then (6 - |y|) / 4 down to -1 at 10, -1 beyond
    torch.testing.assert_close(
        overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
    )
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, factor=2.0)[2], torch.tensor(-0.5))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 0), torch.tensor([0.0, 0, 0, 0, 0, -1.0]))


def test_an_overlong_buffer_as_long_as_the_limit_is_refused():
    """L_cache >= L_max: the punishment would start at or before the first token, punishing every response."""
    assert check_overlong_buffer(9, 10) == 9 and check_overlong_buffer(0, 10) == 0
    # L_cache 9 of 10: a response of 1 token is not punished, one of 2 tokens is, by (1 - 2) / 9
    torch.testing.assert_close(overlong_penalty(torch.tensor([1, 2]), 10, 9), torch.tensor([0.0, -1 / 9]))
    for buffer in (10, 12):
        with pytest.raises(
            ValueError, match=rf"overlong_buffer \({buffer}\) must be shorter .*max_new_tokens \(10\)"
        ):
            overlong_penalty(torch.tensor([1, 5]), 10, buffer)  # the old code gave [-0.1, -0.5]
    with pytest.raises(ValueError, match="overlong_buffer must be >= 0"):
        check_overlong_buffer(-1, 10)


def test_the_agent_checks_the_overlong_buffer_against_the_environment(
    fresh_policy, tokenizer, task_prompts, task_reward
):
    small = dict(prompts_per_update=2, group_size=2, progress=False)
    agent = DAPOAgent(fresh_policy(), tokenizer, DAPOConfig(overlong_buffer=4, **small))
    with pytest.raises(ValueError, match=r"overlong_buffer \(4\) must be shorter .*max_new_tokens \(4\)"):
        agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=4)
    env = agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=5)  # 4 < 5: accepted
    batch = agent.rollout(env)
    # L_max 5, L_cache 4: punished from 1 token on, (1 - |y|) / 4
    expected = batch.returns + (1 - batch.lengths) / 4
    np.testing.assert_allclose(agent.sequence_rewards(batch).numpy(), expected, atol=1e-6)
    short = DAPOAgent(fresh_policy(), tokenizer, DAPOConfig(**small)).make_env(
        task_prompts, task_reward, num_envs=4, max_new_tokens=3
    )
    with pytest.raises(ValueError, match=r"overlong_buffer \(4\) must be shorter .*max_new_tokens \(3\)"):
        agent.train(short, 1)  # an environment built elsewhere: refused before any rollout
    assert agent.update == 0 and agent.sampled_tokens == 0
    batch.extras["max_new_tokens"] = 4  # learn() on episodes of a shorter budget: refused as well
    with pytest.raises(ValueError, match="must be shorter"):
        agent.learn(batch)


def test_informative_groups():
    scores = np.array([1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 3.0, 3.0])
    assert informative_groups(scores, 2).tolist() == [False, True, False, False]


def test_dynamic_sampling_keeps_only_informative_groups(fresh_policy, tokenizer, task_prompts, task_reward):
    config = DAPOConfig(prompts_per_update=4, group_size=4, max_sampling_rounds=3, progress=False, seed=0)
    agent = DAPOAgent(fresh_policy(), tokenizer, config)
    env = agent.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=5)
    batch = agent.rollout(env)
    extras = batch.extras
    assert extras["groups_kept"] == len(batch) // 4 <= 4
    assert informative_groups(batch.scores, 4).all()  # every kept group has distinct scores
    assert extras["groups_sampled"] == 4 * extras["sampling_rounds"] > extras["groups_kept"]  # some dropped
    assert extras["sampled_tokens"] > batch.num_tokens  # the dropped groups' tokens count too
    # the shaped reward: return + overlong penalty (L_max 5, L_cache 1: -1 at the limit)
    expected = batch.returns - (batch.lengths == 5)
    np.testing.assert_allclose(agent.sequence_rewards(batch).numpy(), expected, atol=1e-6)


@pytest.mark.slow
def test_dapo_raises_the_score(pg_learning_run):
    _, history, start, end = pg_learning_run(
        DAPOAgent, DAPOConfig, prompts_per_update=4, group_size=4, score_key="sampled_score"
    )
    assert start < 0.6 and end > start + 1.0, (start, end)
    assert all(h["groups_kept"] <= 4 for h in history)
