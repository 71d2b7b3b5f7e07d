"""Online DPO: pairs from two samples per prompt ranked by the reward, ties skipped, learning on the tiny task
through the Gym API, LoRA with the fused adapter-disabled reference, exact resume."""

import math

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from agents.dpo import sequence_logprobs
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
from agents.policy import SequenceBatch

FAST = dict(learning_rate=1e-2, prompts_per_update=16, minibatch_size=16, progress=False, seed=0)


def make(agent, prompts, reward, **kwargs):
    return agent.make_env(prompts, reward, num_envs=8, max_new_tokens=5, **kwargs)


def test_online_dpo_raises_the_reward_model_score(fresh_policy, tokenizer, task_prompts, task_reward):
    agent = OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST))
    history = agent.train(make(agent, task_prompts, task_reward), 10)
    start = np.mean([h["score"] for h in history[:2]])
    end = np.mean([h["score"] for h in history[-2:]])
    assert start < 0.6 and end > start + 0.8, (start, end)  # fails if learning is broken
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert history[-1]["kl"] > history[0]["kl"]  # the env measures the KL to the frozen reference
    assert {"pairs", "ties", "reward_accuracy", "reward_margin", "chosen_score", "rejected_score"} <= set(
        history[0]
    )
    for h in history:  # every prompt was answered twice; a pair is decided or a tie
        assert h["pairs"] + h["ties"] == 16 and h["chosen_score"] >= h["rejected_score"]
    assert agent.ties == sum(int(h["ties"]) for h in history)
    assert agent.sampled_tokens == history[-1]["sampled_tokens"] > 0


def test_pairs_put_the_higher_scored_sample_first_and_skip_ties(
    fresh_policy, tokenizer, task_prompts, task_reward
):
    agent = OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST))
    env = make(agent, task_prompts, task_reward)
    draws = agent.sample(env, np.array([0, 1, 2, 3, 0, 1, 2, 3]), seed=5)
    assert np.array_equal(draws.prompt_index, np.repeat([0, 1, 2, 3, 0, 1, 2, 3], 2))
    batch, stats = agent.pairs(draws)
    scores = draws.scores.reshape(8, 2)
    decided = np.flatnonzero(scores[:, 0] != scores[:, 1])
    assert stats["pairs"] == len(decided) > 0 and stats["ties"] == 8 - len(decided)
    # Chosen rows first: each chosen response is the higher-scored one of its prompt's two samples.
    n = len(decided)
    texts = [
        tokenizer.decode(batch.response_ids[i][batch.response_mask[i]], skip_special_tokens=True)
        for i in range(2 * n)
    ]
    chosen_scores, rejected_scores = task_reward(None, texts[:n]), task_reward(None, texts[n:])
    assert all(c > r for c, r in zip(chosen_scores, rejected_scores))
    assert sorted(chosen_scores) == sorted(scores[decided].max(axis=1).tolist())


def test_all_ties_take_no_step_and_are_counted(fresh_policy, tokenizer, task_prompts):
    agent = OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST))
    before = {k: v.clone() for k, v in agent.policy.state_dict().items()}
    history = agent.train(make(agent, task_prompts, lambda p, r: [1.0] * len(r)), 2)
    assert [h["ties"] for h in history] == [16.0, 16.0] and agent.ties == 32
    assert "loss" not in history[0]
    for name, value in agent.policy.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)


def test_online_dpo_with_lora_uses_the_fused_adapter_disabled_reference(
    fresh_policy, tokenizer, task_prompts, task_reward, tmp_path
):
    base = fresh_policy()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    options = {**FAST, "learning_rate": 3e-2}
    agent = OnlineDPOAgent(
        base, tokenizer, OnlineDPOConfig(**options, lora_rank=4, log_dir=str(tmp_path / "tb"))
    )
    env = make(agent, task_prompts, task_reward)
    assert agent.reference is None and env.fused_policy is agent.policy  # one decode for policy and reference
    history = agent.train(env, 3)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert any(
        p.abs().max() > 0 for n, p in agent.policy.named_parameters() if "lora_B" in n
    )  # adapters moved
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the env's reference is the policy's base
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard logs
    merged = agent.policy.get_base_model().state_dict()
    for name, value in before.items():  # the base never changes: it stays the reference
        key = next(k for k in merged if k.replace("base_layer.", "") == name)
        torch.testing.assert_close(merged[key], value)
    batch = SequenceBatch.build([[5, 6]], [[7, 8]], pad_id=0, device="cpu")
    with torch.no_grad(), agent.policy.disable_adapter():
        assert float(sequence_logprobs(agent.policy, batch)) == pytest.approx(
            float(sequence_logprobs(fresh_policy(), batch)), abs=1e-5
        )


def test_token_budget_stops_the_run(fresh_policy, tokenizer, task_prompts, task_reward):
    agent = OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST))
    history = agent.train(make(agent, task_prompts, task_reward), total_tokens=200)
    assert (
        agent.sampled_tokens >= 200 and history[-2]["sampled_tokens"] < 200
    )  # stops at the first update past it
    with pytest.raises(ValueError, match="total_updates, total_tokens"):
        agent.train(make(agent, task_prompts, task_reward))
    with pytest.raises(ValueError, match="decays over total_updates"):
        OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST, lr_schedule="cosine")).train(
            make(agent, task_prompts, task_reward), total_tokens=100
        )


def test_resume_matches_the_uninterrupted_run(fresh_policy, tokenizer, task_prompts, task_reward, tmp_path):
    options = {**FAST, "learning_rate": 3e-3, "prompts_per_update": 8, "minibatch_size": 4}
    config = OnlineDPOConfig(**options, epochs=2, lr_schedule="cosine")
    straight = OnlineDPOAgent(fresh_policy(), tokenizer, config)
    full = straight.train(make(straight, task_prompts, task_reward), 4)

    class Interrupt(Exception):
        pass

    def stop_after_two(update, stats):
        if update == 2:
            raise Interrupt

    interrupted = OnlineDPOAgent(fresh_policy(), tokenizer, config)
    with pytest.raises(Interrupt):
        interrupted.train(
            make(interrupted, task_prompts, task_reward),
            4,
            checkpoint_dir=tmp_path / "ck",
            callback=stop_after_two,
        )
    resumed = OnlineDPOAgent(fresh_policy(), tokenizer, config)
    resumed.load_checkpoint(tmp_path / "ck")
    assert resumed.update == 2 and resumed.sampled_tokens == full[1]["sampled_tokens"]
    rest = resumed.train(make(resumed, task_prompts, task_reward), 4)
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[2:]]
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()
    assert (straight.ties, straight.sampled_tokens) == (resumed.ties, resumed.sampled_tokens)
    # 2 epochs of (decided pairs / minibatches of 4) per update, none for an update of ties only.
    steps = sum(2 * -(-int(h["pairs"]) // 4) for h in full)
    assert straight.optimizer_steps == resumed.optimizer_steps == steps > 0


def test_errors_say_how_to_fix_them(fresh_policy, tokenizer, task_prompts, task_reward):
    with pytest.raises(ValueError, match="minibatch_size"):
        OnlineDPOConfig(prompts_per_update=4, minibatch_size=8)
    with pytest.raises(ValueError, match="beta must be > 0"):
        OnlineDPOConfig(beta=0)
    agent = OnlineDPOAgent(fresh_policy(), tokenizer, OnlineDPOConfig(**FAST))
    env = make(agent, task_prompts, task_reward, autoreset_mode=AutoresetMode.NEXT_STEP)
    with pytest.raises(ValueError, match="autoreset_mode"):
        agent.train(env, 1)
