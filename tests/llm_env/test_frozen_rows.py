"""Rows that do not step this turn (finished, frozen, waiting) must not move the reference's cache.

The reference decodes all B rows in one static-shape forward pass per step. The models here have a
context of exactly ``max_prompt_length + max_new_tokens``, so a row that moved one position too far would
index past GPT-2's position table (an IndexError), and on a Llama with dynamic RoPE it would switch the
rotary frequencies of the whole batch, changing every other row's reference log-probabilities (RoPE has
no table to overflow, so the dynamic scaling is what makes a drifting position observable there).
"""

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from peft import LoraConfig, get_peft_model

import llm_env
from llm_env.tiny import tiny_gpt2, tiny_llama

PROMPTS = ["the film was", "a great movie", "i liked the", "this book is"]  # 3 tokens each
NEW_TOKENS = 4
CONTEXT = 3 + NEW_TOKENS


def tight_model(arch, tokenizer):
    """A reference whose context is exactly the env's observation length."""
    if arch == "gpt2":
        return tiny_gpt2(tokenizer, seed=1, n_positions=CONTEXT)
    # initializer_range 0.2: attention far enough from uniform that a RoPE change shows in the log-probs
    return tiny_llama(
        tokenizer,
        seed=3,
        max_position_embeddings=CONTEXT,
        initializer_range=0.2,
        rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    )


def env_options(arch, tokenizer, reward_fn):
    reference = tight_model(arch, tokenizer)
    return dict(
        prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, reference=reference,
        max_new_tokens=NEW_TOKENS, kl_coef=1.0,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt2-fused"])
def test_next_step_autoreset_at_the_full_context_matches_sync_vector_env(arch, tokenizer, reward_fn):
    """A row truncated at the last position is reset one step later; it must not be decoded past it."""
    options = env_options(arch.removesuffix("-fused"), tokenizer, reward_fn)
    native_options = options
    if arch.endswith("-fused"):  # LoRA policy and reference in one forward pass over 2B rows
        policy = get_peft_model(
            options["reference"], LoraConfig(r=4, fan_in_fan_out=True, init_lora_weights=False)
        ).eval()
        options = {**options, "reference": llm_env.AdapterDisabled(policy)}
        native_options = {**options, "reference": llm_env.AdapterDisabled(policy, fuse=True)}
    native = llm_env.TextGenVectorEnv(num_envs=3, **native_options)
    sync = gym.vector.SyncVectorEnv([lambda: llm_env.TextGenEnv(**options) for _ in range(3)])
    native.reset(seed=5)
    sync.reset(seed=5)
    rng = np.random.default_rng(0)
    truncations = 0
    for _ in range(24):
        actions = rng.integers(3, len(tokenizer), size=3)
        actions[rng.random(3) < 0.2] = tokenizer.eos_token_id  # EOS staggers the rows' episodes
        _, r_a, te_a, tr_a, _ = native.step(torch.as_tensor(actions))
        _, r_b, te_b, tr_b, _ = sync.step(actions)
        np.testing.assert_allclose(r_a.numpy(), r_b, atol=1e-5)
        np.testing.assert_array_equal(tr_a.numpy(), tr_b)
        np.testing.assert_array_equal(te_a.numpy(), te_b)
        truncations += int(tr_b.sum())
    assert truncations >= 4  # episodes did reach the last position of the context


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_frozen_row_neither_moves_nor_disturbs_the_others(arch, tokenizer, reward_fn):
    """With autoreset disabled, a finished row waits for its reset: 1 or 20 steps makes no difference."""
    options = env_options(arch, tokenizer, reward_fn)
    fresh = llm_env.TextGenEnv(**options)
    tokens = [5, 6, 7, 8]  # no stop token: every episode runs to the last position of the context

    def single_rewards(prompt):
        fresh.reset(options={"prompt_index": prompt})
        return [fresh.step(token)[1] for token in tokens]

    after_freeze = {}
    for frozen_steps in (1, 20):
        envs = llm_env.TextGenVectorEnv(num_envs=2, autoreset_mode=AutoresetMode.DISABLED, **options)
        envs.reset(seed=0, options={"prompt_indices": [0, 1]})
        taken, rewards = [0, 0], [[], []]
        row1_episodes, restart_at = [], NEW_TOKENS + frozen_steps
        for step in range(restart_at + NEW_TOKENS):
            if step == restart_at:  # row 0 has waited long enough: a new episode with prompt 2
                envs.reset(options={"reset_mask": np.array([True, False]), "prompt_indices": [2]})
                taken[0], rewards[0] = 0, []
            frozen = step >= NEW_TOKENS and step < restart_at
            action = torch.tensor([tokens[min(taken[0], NEW_TOKENS - 1)], tokens[taken[1]]])
            _, reward, _, truncated, _ = envs.step(action)
            if frozen:
                assert float(reward[0]) == 0.0 and bool(truncated[0])  # frozen: nothing paid, flag kept
            else:
                rewards[0].append(float(reward[0]))
                taken[0] += 1
            rewards[1].append(float(reward[1]))
            taken[1] += 1
            if bool(truncated[1]):  # row 1 keeps running episodes of prompt 1 all along
                row1_episodes.append(rewards[1])
                envs.reset(options={"reset_mask": np.array([False, True]), "prompt_indices": [1]})
                taken[1], rewards[1] = 0, []
        after_freeze[frozen_steps] = rewards[0]
        assert len(row1_episodes) >= 2
        for episode in row1_episodes:
            np.testing.assert_allclose(episode, single_rewards(1), atol=1e-5)
    np.testing.assert_allclose(after_freeze[1], single_rewards(2), atol=1e-5)
    np.testing.assert_allclose(after_freeze[20], after_freeze[1], atol=1e-6)
