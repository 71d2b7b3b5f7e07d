"""FusedDecoder: a LoRA policy and its adapter-disabled reference decoded in one forward over 2B rows."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

import llm_env
from llm_env.decoding import IncrementalLM, left_pad
from llm_env.fused import FusedDecoder
from llm_env.tiny import tiny_gpt2, tiny_llama

PROMPTS = ["the film was", "a great movie", "i liked the", "this book is", "the food was cold and"]


def lora(model, target_modules, **options):
    """A peft LoRA model whose adapters are not zero (as after training), so policy != reference."""
    gpt2 = model.config.model_type == "gpt2"  # GPT-2's Conv1D layers store their weights transposed
    config = LoraConfig(
        r=4, target_modules=target_modules, fan_in_fan_out=gpt2, init_lora_weights=False, **options
    )
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt2-embedding"])
def test_fused_halves_match_separate_policy_and_reference_decodes_across_restarts(arch, tokenizer):
    if arch == "gpt2":
        policy = lora(tiny_gpt2(tokenizer, seed=11), ["c_attn", "c_fc"])
    elif arch == "gpt2-embedding":  # a LoRA embedding: peft's mixed-batch adapter_names forward
        policy = lora(tiny_gpt2(tokenizer, seed=11), ["c_attn", "wte"])
    else:
        policy = lora(tiny_llama(tokenizer, seed=11), ["q_proj", "v_proj", "down_proj"])
    vocab, batch = len(tokenizer), 3
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab, size=n) for n in (3, 6, 1)]
    fused = FusedDecoder(policy, batch, capacity=24)
    # LoRA on linear layers masks the adapter term per row; other layers use peft's adapter_names.
    assert (fused._masking is None) == (arch == "gpt2-embedding")
    own = IncrementalLM(policy, batch, capacity=24)
    ref = IncrementalLM(policy, batch, capacity=24, context=policy.disable_adapter)
    ids, lengths = left_pad(seqs, pad_id=0, device="cpu")
    rows = np.arange(batch)
    ref_out = fused.prefill(rows, ids, lengths)
    torch.testing.assert_close(ref_out.logits, ref.prefill(rows, ids, lengths).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        fused.policy_logits, own.prefill(rows, ids, lengths).logits, atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(fused.policy_logits, ref_out.logits)  # the halves really differ
    for step in range(6):
        tokens = torch.as_tensor(rng.integers(0, vocab, size=batch))
        ref_out = fused.decode(tokens)
        torch.testing.assert_close(ref_out.logits, ref.decode(tokens).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused.policy_logits, own.decode(tokens).logits, atol=1e-5, rtol=1e-5)
        if step in (1, 4):  # restart one row while the others continue: only it is prefilled
            row = np.array([step % batch])
            ids, lengths = left_pad([rng.integers(0, vocab, size=5)], pad_id=0, device="cpu")
            restarted = fused.prefill(row, ids, lengths)
            torch.testing.assert_close(
                restarted.logits, ref.prefill(row, ids, lengths).logits, atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                fused.policy_logits[row], own.prefill(row, ids, lengths).logits, atol=1e-5, rtol=1e-5
            )


def test_policy_logits_are_returned_only_for_the_observation_they_belong_to(tokenizer, reward_fn):
    policy = lora(tiny_gpt2(tokenizer, seed=12), ["c_attn"])
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, max_new_tokens=4)
    env = llm_env.TextGenVectorEnv(
        num_envs=2, reference=llm_env.AdapterDisabled(policy, fuse=True), **options
    )
    other = llm_env.TextGenVectorEnv(
        num_envs=2, reference=llm_env.AdapterDisabled(policy, fuse=True), **options
    )
    obs, _ = env.reset(seed=0)
    other_obs, _ = other.reset(seed=1)
    assert env.fused_policy is policy and other.fused_policy is policy
    logits = env.policy_logits(obs, policy)
    assert logits is not None and logits.shape == (2, len(tokenizer))
    other_logits = other.policy_logits(other_obs, policy)
    assert other_logits is not None and not torch.equal(other_logits, logits)  # each env its own states
    assert env.policy_logits(other_obs) is None  # another environment's observation
    assert env.policy_logits({k: v.clone() for k, v in obs.items()}) is None  # a copy is not the env's state
    assert env.policy_logits(obs, tiny_gpt2(tokenizer)) is None  # another model
    obs2, *_ = env.step(torch.tensor([5, 6]))
    assert env.policy_logits(obs, policy) is None  # stale: the env has moved on
    assert env.policy_logits(obs2, policy) is not None
    env.close()  # the environment's decoder goes away with it
    assert env.policy_logits(obs2, policy) is None and env.fused_policy is None
    plain = llm_env.TextGenVectorEnv(num_envs=2, reference=llm_env.AdapterDisabled(policy), **options)
    plain_obs, _ = plain.reset(seed=0)
    assert plain.fused_policy is None and plain.policy_logits(plain_obs) is None  # nothing fused


def test_fused_env_rewards_equal_the_unfused_env(tokenizer, reward_fn):
    policy = lora(tiny_gpt2(tokenizer, seed=13), ["c_attn", "c_fc"])
    options = dict(prompts=PROMPTS, tokenizer=tokenizer, reward=reward_fn, max_new_tokens=3, kl_coef=0.5)
    fused = llm_env.TextGenVectorEnv(
        num_envs=2, reference=llm_env.AdapterDisabled(policy, fuse=True), **options
    )
    plain = llm_env.TextGenVectorEnv(num_envs=2, reference=llm_env.AdapterDisabled(policy), **options)
    fused.reset(seed=0)
    plain.reset(seed=0)
    for tokens in ([5, 6], [7, 8], [9, 10], [4, 3], [2, 5]):  # crosses an autoreset
        action = llm_env.TokenActions(torch.tensor(tokens), torch.tensor([-1.0, -2.0]))
        a, b = fused.step(action), plain.step(action)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
        assert torch.equal(a[0]["input_ids"], b[0]["input_ids"])


def test_fused_reference_needs_one_active_adapter(tokenizer):
    with pytest.raises(TypeError, match="peft model"):
        llm_env.AdapterDisabled(tiny_gpt2(tokenizer), fuse=True)

    class TwoAdapters(torch.nn.Module):
        active_adapter = ["a", "b"]

        def disable_adapter(self):  # pragma: no cover - never entered
            raise AssertionError

    with pytest.raises(ValueError, match="one active adapter"):
        llm_env.AdapterDisabled(TwoAdapters(), fuse=True)


def test_dora_is_refused(tokenizer):
    policy = lora(tiny_gpt2(tokenizer, seed=15), ["c_attn"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        FusedDecoder(policy, 1, capacity=8)


def test_a_merged_adapter_is_refused(tokenizer):
    policy = lora(tiny_gpt2(tokenizer, seed=14), ["c_attn"])
    fused = FusedDecoder(policy, 1, capacity=8)
    policy.merge_adapter()  # the base weights now include the adapter: they are no reference any more
    with pytest.raises(RuntimeError, match="merged"):
        fused.prefill(np.array([0]), torch.tensor([[5, 6]]), np.array([2]))
