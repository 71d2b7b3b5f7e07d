"""Rejection sampling: a round beats the policy it started from; the best-of-k KL matches theory."""

import math

import numpy as np
import pytest
import torch

from agents.rejection import (
    RejectionSamplingAgent,
    RejectionSamplingConfig,
    best_of_k_kl,
    best_of_k_kl_theory,
)
from agents.sft import SFTConfig


def mean_score(agent, env, samples=16, seed=123):
    """The policy's own mean score on fresh samples (not the ones it was selected on)."""
    draws = agent.sample(env, np.arange(env.num_prompts), samples, seed=seed)
    return float(np.mean(draws.scores))


def config(**kwargs):
    options = dict(
        k=8,
        kl_groups=2,
        sft=SFTConfig(learning_rate=1e-2, epochs=8, lr_schedule="constant", progress=False),
        progress=False,
    )
    options.update(kwargs)
    return RejectionSamplingConfig(**options)


def test_a_round_raises_the_score_above_the_starting_policy(
    fresh_policy, tokenizer, task_prompts, task_reward, gpt2
):
    agent = RejectionSamplingAgent(fresh_policy(), tokenizer, config())
    env = agent.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=5, reference=gpt2)
    before = mean_score(agent, env)
    stats = agent.run_round(env)
    after = mean_score(agent, env)
    assert stats["best_score"] > stats["sample_score"]  # selection picks above-average samples
    assert after > before + 0.15, (before, after)  # and fine-tuning on them moves the policy (noise ~0.05)
    assert stats["pool_size"] == len(task_prompts)
    for item in agent.pool:  # every kept response answers its own prompt
        assert item["prompt"] == task_prompts[item["prompt_index"]]
        text = tokenizer.decode(
            env.prompt_token_ids(item["prompt_index"]).tolist() + item["response_ids"],
            skip_special_tokens=True,
        )
        assert text.endswith(item["response"]) and item["score"] == task_reward([""], [item["response"]])[0]
    assert stats["kl_best_of_k_theory"] == pytest.approx(math.log(8) - 7 / 8)
    assert "kl_best_of_k_measured" in stats and "kl_to_reference" in stats


def test_pool_accumulates_across_rounds_and_resume_is_exact(
    fresh_policy, tokenizer, task_prompts, task_reward, tmp_path
):
    straight = RejectionSamplingAgent(fresh_policy(), tokenizer, config(rounds=2, k=4))
    env = straight.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=4)
    history = straight.train(env)
    assert [h["pool_size"] for h in history] == [4.0, 8.0]

    first = RejectionSamplingAgent(fresh_policy(), tokenizer, config(rounds=1, k=4))
    first.train(
        first.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=4),
        checkpoint_dir=tmp_path / "rs",
    )
    resumed = RejectionSamplingAgent(fresh_policy(), tokenizer, config(rounds=2, k=4))
    resumed.load_checkpoint(tmp_path / "rs")
    assert resumed.round == 1 and len(resumed.pool) == 4
    resumed.train(resumed.make_env(task_prompts, task_reward, num_envs=8, max_new_tokens=4))
    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert straight.pool == resumed.pool
    # Every sampled token counted (the KL-measurement draws too), every fine-tuning step, across the resume.
    assert (straight.sampled_tokens, straight.optimizer_steps) == (
        resumed.sampled_tokens,
        resumed.optimizer_steps,
    )
    assert history[-1]["sampled_tokens"] == straight.sampled_tokens > 0
    assert history[-1]["optimizer_steps"] == straight.optimizer_steps > 0


def test_latest_pool_keeps_only_the_current_round(fresh_policy, tokenizer, task_prompts, task_reward):
    agent = RejectionSamplingAgent(
        fresh_policy(), tokenizer, config(rounds=2, k=2, pool="latest", kl_groups=1)
    )
    history = agent.train(agent.make_env(task_prompts, task_reward, num_envs=4, max_new_tokens=3))
    assert [h["pool_size"] for h in history] == [4.0, 4.0]
    assert "kl_best_of_k_measured" not in history[0]


@pytest.mark.parametrize("k", [2, 4, 8])
def test_best_of_k_kl_estimator_matches_theory_without_ties(k):
    scores = np.random.default_rng(k).normal(size=(400, 4 * k))
    assert best_of_k_kl(scores, k) == pytest.approx(best_of_k_kl_theory(k), abs=0.04)


def test_best_of_k_kl_detects_a_broken_selection_and_ties():
    # All-tied rewards: selection cannot prefer anything, so best-of-k is the sampling policy: KL 0.
    assert best_of_k_kl(np.zeros((10, 8)), 4) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="m >= 2"):
        best_of_k_kl(np.zeros((3, 4)), 4)


def test_config_errors():
    with pytest.raises(ValueError, match="k must be"):
        RejectionSamplingConfig(k=0)
    with pytest.raises(ValueError, match="lora_rank on RejectionSamplingConfig"):
        RejectionSamplingConfig(sft=SFTConfig(lora_rank=4))
