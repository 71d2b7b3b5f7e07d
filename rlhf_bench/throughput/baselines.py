"""The baselines the environment is measured against, in the same process and on the same models.

* :func:`generate`: the policy's Hugging Face ``generate`` alone (a).
* :func:`monolithic`: the TRL-style rollout (b): ``generate`` recording the sampled tokens'
  log-probabilities, one reference forward over the whole batch, the per-token KL reward and one
  reward-model forward.
* :func:`no_cache`: the RL4LMs-style loop (d): every step re-encodes the whole sequence with the policy and
  the reference.

Each returns the number of generated tokens, so the caller can check that every variant did the same work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessorList

from agents.policy import sample_tokens
from llm_env.kl import kl_penalty
from llm_env.reward import sequence_scores
from rlhf_bench.throughput.models import Setup

__all__ = ["LogprobRecorder", "generate", "monolithic", "no_cache", "reference_logprobs"]


class LogprobRecorder:
    """A ``generate`` logits processor that records log pi(token) of each sampled token.

    It is called with the scores of step t (after temperature) and the ids including the token sampled at
    step t - 1, so it gathers the previous step's log-softmax at that token: one (B, V) log-softmax per
    step, as the environment's sampler does, and no (B, T, V) tensor is kept (TRL's rollout computes the
    same log-probabilities from ``output_scores``).
    """

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probabilities, given the tokens sampled at the last step."""
        self.logprobs.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.logprobs, dim=1)


def generate(
    model: nn.Module, setup: Setup, recorder: LogprobRecorder | None = None, *, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``new_tokens`` tokens for every prompt; returns the (B, P + N) sequences (and log-probs)."""
    s = setup.settings
    ids = setup.prompt_ids
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=sample,
        temperature=s.temperature if sample else None,
        top_k=None,
        top_p=None,
        max_new_tokens=s.new_tokens,
        min_new_tokens=s.new_tokens,  # no early stop: every variant generates exactly B * N tokens
        pad_token_id=0,
        eos_token_id=1,
        logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
    )
    if out.shape[1] != s.prompt_length + s.new_tokens:
        raise RuntimeError(f"generate produced {out.shape[1] - s.prompt_length} tokens, not {s.new_tokens}")
    logprobs = recorder.finish(out[:, -1]) if recorder is not None else None
    return out, logprobs


def reference_logprobs(model: nn.Module, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """log pi_ref of the generated tokens from one forward pass over the whole batch, (B, N) float32.

    Only the N positions that predict response tokens go through the LM head (``logits_to_keep``), and
    the log-probability is ``logit - logsumexp`` without materialising a (B, N, V) log-softmax, as TRL's
    ``selective_log_softmax`` does.
    """
    new = sequences.shape[1] - prompt_length
    logits = model(
        input_ids=sequences, attention_mask=torch.ones_like(sequences), logits_to_keep=new + 1
    ).logits[:, :-1]  # (B, N, V): position P - 1 + j predicts response token j
    logits = logits.float()
    tokens = sequences[:, prompt_length:, None]
    return logits.gather(2, tokens).squeeze(2) - torch.logsumexp(logits, dim=-1)


def monolithic(
    setup: Setup,
    policy: nn.Module,
    reference: nn.Module,
    reward: nn.Module,
    context: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    sample: bool = True,
) -> int:
    """(b): generate + one reference forward + one reward-model forward; returns generated tokens."""
    s = setup.settings
    recorder = LogprobRecorder()
    with torch.no_grad():
        sequences, logprobs = generate(policy, setup, recorder, sample=sample)
        with context():
            ref_logprobs = reference_logprobs(reference, sequences, s.prompt_length)
        rewards = -s.kl_coef * kl_penalty(logprobs, ref_logprobs, "k1")  # (B, N) dense KL reward
        scores = sequence_scores(reward, sequences, torch.ones_like(sequences))
        rewards[:, -1] += scores
    return int(sequences[:, s.prompt_length :].numel())


def no_cache(setup: Setup, policy: nn.Module, reference: nn.Module, reward: nn.Module) -> int:
    """(d): each step re-encodes the whole sequence with the policy and the reference (RL4LMs-style).

    Only the last position goes through the LM head and sampling is the environment agents' own
    (:func:`agents.policy.sample_tokens`), so the difference to (c) is the missing KV cache alone.
    """
    s = setup.settings
    generator = torch.Generator(device=setup.device).manual_seed(s.seed)
    sequences = setup.prompt_ids
    rewards = []
    with torch.no_grad():
        for _ in range(s.new_tokens):
            mask = torch.ones_like(sequences)
            logits = policy(input_ids=sequences, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            logprobs = torch.log_softmax(logits.float() / s.temperature, dim=-1)
            tokens = sample_tokens(logprobs, generator)[:, None]  # (B, 1)
            ref_logits = reference(input_ids=sequences, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
            kl = kl_penalty(logprobs.gather(1, tokens), ref_logprobs.gather(1, tokens), "k1")
            rewards.append(-s.kl_coef * kl)
            sequences = torch.cat([sequences, tokens], dim=1)
        scores = sequence_scores(reward, sequences, torch.ones_like(sequences))
        rewards[-1] = rewards[-1] + scores[:, None]
    return int(sequences[:, s.prompt_length :].numel())
