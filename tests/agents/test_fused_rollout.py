"""Fused policy + adapter-disabled reference decoding: the same rollouts as the unfused environment."""

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from peft import LoraConfig, get_peft_model

import llm_env
from agents.policy import TokenSampler
from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import collect_episodes
from llm_env.tiny import tiny_gpt2


def lora_policy(tokenizer):
    """A LoRA policy whose adapters are not zero, so that the policy and its reference differ."""
    torch.manual_seed(0)  # the adapter initialisation draws from the global generator
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    return get_peft_model(tiny_gpt2(tokenizer, seed=21), config)


def rollout(tokenizer, prompts, reward, *, fuse, mode, temperature):
    policy = lora_policy(tokenizer)
    env = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=prompts,
        tokenizer=tokenizer,
        reward=reward,
        reference=llm_env.AdapterDisabled(policy, fuse=fuse),
        kl_coef=0.3,
        max_new_tokens=4,
        autoreset_mode=mode,
    )
    sampler = TokenSampler(
        policy, temperature=temperature, generator=torch.Generator().manual_seed(1), env=env
    )
    return collect_episodes(env, sampler, 8, seed=3), sampler


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_fused_rollout_equals_unfused_rollout(mode, temperature, tokenizer, task_prompts, task_reward):
    fused, fused_sampler = rollout(
        tokenizer, task_prompts, task_reward, fuse=True, mode=mode, temperature=temperature
    )
    plain, plain_sampler = rollout(
        tokenizer, task_prompts, task_reward, fuse=False, mode=mode, temperature=temperature
    )
    assert len(fused) == len(plain) == 8  # 8 episodes on 3 rows: restarts in the middle of the rollout
    assert np.array_equal(fused.prompt_index, plain.prompt_index)
    assert torch.equal(fused.response_ids, plain.response_ids)
    torch.testing.assert_close(fused.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.rewards, plain.rewards, atol=1e-5, rtol=0)
    np.testing.assert_allclose(fused.kl, plain.kl, atol=1e-5)
    np.testing.assert_allclose(fused.returns, plain.returns, atol=1e-5)
    assert np.array_equal(fused.scores, plain.scores) and np.array_equal(fused.eos, plain.eos)
    assert np.abs(fused.kl).max() > 1e-3  # the policy and its reference really differ
    # The fused sampler never ran its own decode; the unfused one did.
    assert not fused_sampler.lm.cache.layers[0].is_initialized
    assert plain_sampler.lm.cache.layers[0].is_initialized


def full_forward_logprob(model, ids, token):
    with torch.no_grad():
        return float(model(torch.as_tensor(ids)[None]).logits[0, -1].float().log_softmax(-1)[token])


def test_sampler_falls_back_to_its_own_cache_for_other_observations(tokenizer, task_prompts, task_reward):
    """After acting from fused logits, a foreign observation makes the sampler re-encode every row."""
    policy = lora_policy(tokenizer).eval()
    env = llm_env.TextGenVectorEnv(
        num_envs=2,
        prompts=task_prompts,
        tokenizer=tokenizer,
        reward=task_reward,
        reference=llm_env.AdapterDisabled(policy, fuse=True),
        max_new_tokens=6,
    )
    sampler = TokenSampler(policy, generator=torch.Generator().manual_seed(0), env=env)
    obs, _ = env.reset(seed=0)
    restarted = np.ones(2, dtype=bool)
    for step in range(4):
        if step >= 2:  # a copy is not the env's own observation: no fused logits for it
            obs = {key: value.clone() for key, value in obs.items()}
        action = sampler.act(obs, restarted)
        for row in range(2):
            length = int(obs["attention_mask"][row].sum())
            expected = full_forward_logprob(policy, obs["input_ids"][row, :length], int(action.tokens[row]))
            assert float(action.logprobs[row]) == pytest.approx(expected, abs=1e-5)
        obs, *_ = env.step(action)
        restarted = np.zeros(2, dtype=bool)
    assert sampler.lm.cache.layers[0].is_initialized


def test_ppo_with_a_fused_reference_trains_like_the_unfused_one(tokenizer, task_prompts, task_reward):
    def train(fuse):
        torch.manual_seed(0)
        config = PPOConfig(
            episodes_per_update=4,
            minibatch_size=2,
            ppo_epochs=1,
            learning_rate=1e-2,
            lora_rank=4,
            fuse_reference=fuse,
            progress=False,
        )
        agent = PPOAgent(tiny_gpt2(tokenizer, seed=2), tokenizer, config)
        assert isinstance(agent.reference, llm_env.AdapterDisabled) and agent.reference.fuse == fuse
        env = agent.make_env(task_prompts, task_reward, num_envs=2, max_new_tokens=4)
        return agent.train(env, 2)

    fused, plain = train(True), train(False)
    for a, b in zip(fused, plain):
        for key in ("score", "kl", "response_length", "policy_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), key


def test_fused_reference_is_the_default_with_lora_only(tokenizer):
    lora = PPOAgent(tiny_gpt2(tokenizer, seed=2), tokenizer, PPOConfig(lora_rank=4, progress=False))
    assert isinstance(lora.reference, llm_env.AdapterDisabled) and lora.reference.fuse
    full = PPOAgent(tiny_gpt2(tokenizer, seed=2), tokenizer, PPOConfig(progress=False))
    assert not isinstance(full.reference, llm_env.AdapterDisabled)  # a frozen copy: nothing to fuse
