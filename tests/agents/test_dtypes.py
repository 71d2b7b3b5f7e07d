"""bf16 and fp16 policies and references: log-probabilities and the KL are computed in float32 from the
logits, and a half-precision run follows the float32 run to within the half-precision rounding."""

import copy

import numpy as np
import pytest
import torch

import llm_env
from agents.policy import SequenceBatch, TokenSampler, response_forward
from llm_env import TokenActions
from llm_env.tiny import numbered_tokenizer, tiny_causal_lm

PROMPTS = ["w5 w6", "w7 w8 w9 w10 w11 w12", "w13 w14 w15"]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def run(policy, reference, tok, actions, device="cpu"):
    """Step a vector env with forced tokens, reporting the sampler's log-probabilities of them; return the
    per-step sampler log-probabilities, rewards and the finished episodes' KL sums."""
    env = llm_env.TextGenVectorEnv(
        num_envs=3,
        prompts=PROMPTS,
        tokenizer=tok,
        reference=reference,
        reward=lambda p, r: [0.0] * len(r),
        kl_coef=1.0,
        max_new_tokens=6,
        device=device,
    )
    sampler = TokenSampler(policy, seed=0)
    obs, _ = env.reset(seed=0)
    restarted = np.ones(3, dtype=bool)
    logprobs, rewards, kls = [], [], []
    for tokens in actions:
        sampler.act(obs, restarted)
        logp = torch.log_softmax(sampler._logits, dim=-1)
        assert logp.dtype == torch.float32
        tokens = tokens.to(device)
        chosen = logp.gather(1, tokens[:, None]).squeeze(1)
        # Forced tokens (a float32 and a half-precision policy would sample different ones): the sampler's
        # cache takes them at its next call as if it had sampled them.
        sampler._last = tokens
        obs, reward, _, _, info = env.step(TokenActions(tokens, chosen))
        assert reward.dtype == torch.float32
        logprobs.append(chosen.cpu())
        rewards.append(reward.cpu())
        if "completion" in info:
            kls.extend(info["completion"]["kl"][info["completion"]["_kl"]].tolist())
        restarted = info.get("_prompt_index", np.zeros(3, dtype=bool))
    return torch.stack(logprobs), torch.stack(rewards), np.array(kls)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_runs_follow_the_float32_run(dtype, tolerance, device):
    tok = numbered_tokenizer(48)
    policy = tiny_causal_lm("llama", tok, seed=1).to(device)
    reference = tiny_causal_lm("llama", tok, seed=0).to(device)
    rng = np.random.default_rng(0)
    actions = [torch.as_tensor(rng.integers(3, 48, size=3)) for _ in range(14)]
    full = run(policy, reference, tok, actions, device)
    half = run(copy.deepcopy(policy).to(dtype), copy.deepcopy(reference).to(dtype), tok, actions, device)
    for a, b in zip(full[:2], half[:2]):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=0)
    assert len(full[2]) == len(half[2]) >= 3
    np.testing.assert_allclose(half[2], full[2], atol=6 * tolerance)
    assert not torch.equal(full[0], half[0])  # the half-precision run really ran in half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_teacher_forced_logprobs_are_float32_and_match_the_sampler(dtype):
    tok = numbered_tokenizer(48)
    policy = tiny_causal_lm("qwen2", tok, seed=1).to(dtype)
    batch = SequenceBatch.build([[5, 6, 7], [8]], [[9, 10, 11], [12, 13]], pad_id=0, device="cpu")
    with torch.no_grad():
        forced = response_forward(policy, batch).logprobs
    assert forced.dtype == torch.float32
    with torch.no_grad():
        logits = policy(torch.tensor([[5, 6, 7, 9, 10]])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[[2, 3, 4], [9, 10, 11]]
    torch.testing.assert_close(forced[0], expected, atol=1e-5, rtol=0)
