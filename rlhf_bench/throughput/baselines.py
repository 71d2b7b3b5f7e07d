"""The baselines the environment is measured against, in the same process and on the same models.

* :func:`generate`: the policy's Hugging Face ``generate`` alone (a).
* :func:`monolithic`: the TRL-style rollout (b): ``generate`` recording the sampled tokens'
  log-probabilities, one reference forward over the whole batch, the per-token KL reward and one
  reward-model forward.
* :func:`no_cache`: the RL4LMs-style loop (d): every step re-encodes the whole sequence with the policy and
  the reference.
* :class:`Floor`: the unavoidable work alone (f): one batched forward of the policy and one of the reference
  per token, each with its KV cache, sampling, and the reward model once at the end.

:func:`generate` returns the sequences; the others return a :class:`Rollout`, what every compared rollout
computes (the sampled tokens, the reference log-probability of each, one score per response), so that the
caller can check that every variant did the same work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList

from agents.policy import sample_tokens
from llm_env.decoding import IncrementalLM
from llm_env.kl import kl_penalty
from llm_env.reward import sequence_scores
from rlhf_bench.throughput.models import Setup

__all__ = ["Floor", "LogprobRecorder", "Rollout", "generate", "monolithic", "no_cache", "reference_logprobs"]


class Rollout(NamedTuple):
    """What a compared rollout computes for its B prompts: the same tensors whichever code produced them."""

    prompt_ids: torch.Tensor  # (B, P)
    responses: torch.Tensor  # (B, N) sampled token ids
    ref_logprobs: torch.Tensor  # (B, N) log pi_ref of each sampled token
    scores: torch.Tensor  # (B,) reward-model scores of the responses

    @property
    def tokens(self) -> int:
        """Generated tokens: B * N."""
        return int(self.responses.numel())


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
) -> Rollout:
    """(b): generate + one reference forward + one reward-model forward."""
    s = setup.settings
    recorder = LogprobRecorder()
    with torch.no_grad():
        sequences, logprobs = generate(policy, setup, recorder, sample=sample)
        with context():
            ref_logprobs = reference_logprobs(reference, sequences, s.prompt_length)
        rewards = -s.kl_coef * kl_penalty(logprobs, ref_logprobs, "k1")  # (B, N) dense KL reward
        scores = sequence_scores(reward, sequences, torch.ones_like(sequences))
        rewards[:, -1] += scores
    return Rollout(setup.prompt_ids, sequences[:, s.prompt_length :], ref_logprobs, scores)


def no_cache(setup: Setup, policy: nn.Module, reference: nn.Module, reward: nn.Module) -> Rollout:
    """(d): each step re-encodes the whole sequence with the policy and the reference (RL4LMs-style).

    Only the last position goes through the LM head and sampling is the environment agents' own
    (:func:`agents.policy.sample_tokens`), so the difference to (c) is the missing KV cache alone.
    """
    s = setup.settings
    generator = torch.Generator(device=setup.device).manual_seed(s.seed)
    sequences = setup.prompt_ids
    rewards, ref_logprobs = [], []
    with torch.no_grad():
        for _ in range(s.new_tokens):
            mask = torch.ones_like(sequences)
            logits = policy(input_ids=sequences, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            logprobs = torch.log_softmax(logits.float() / s.temperature, dim=-1)
            tokens = sample_tokens(logprobs, generator)[:, None]  # (B, 1)
            ref_logits = reference(input_ids=sequences, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            ref_lp = torch.log_softmax(ref_logits.float(), dim=-1)
            ref_logprobs.append(ref_lp.gather(1, tokens))
            kl = kl_penalty(logprobs.gather(1, tokens), ref_logprobs[-1], "k1")
            rewards.append(-s.kl_coef * kl)
            sequences = torch.cat([sequences, tokens], dim=1)
        scores = sequence_scores(reward, sequences, torch.ones_like(sequences))
        rewards[-1] = rewards[-1] + scores[:, None]
    return Rollout(setup.prompt_ids, sequences[:, s.prompt_length :], torch.cat(ref_logprobs, dim=1), scores)


class Floor:
    """(f) The unavoidable work of a rollout and nothing else, so that a variant's ratio to it says how close
    that variant comes to the limit of this decoding code on this hardware.

    Per token: one batched forward of the policy and one of the reference over the new token, each with its
    own KV cache, sampling from the policy's distribution (inverse CDF, :func:`agents.policy.sample_tokens`)
    and the sampled token's log-probability under both; then one
    reward-model forward over the B finished sequences and the dense KL reward, ``-beta (logp - ref_logp)``
    plus the score on the last token. No environment, no agent, no text, no checks: every prompt has the same
    length (no padding), the caches are built once and refilled by each rollout's prefill, and nothing runs
    after the last token is sampled.

    The caches are :class:`llm_env.IncrementalLM`, the decoder the environment and its agents use (a
    preallocated cache read through its filled window; on CPU the LM head computed weight-major), so the
    ratio isolates what the environment adds around the same forward passes. A plain Hugging Face loop
    (``DynamicCache``, the same head) ran 3-5% slower than it on CPU (gpt2-small, 16 x 48 and 4 x 256 tokens,
    one thread); it is a floor for these kernels, not for any kernel (fused attention or, on GPUs, CUDA
    graphs go lower: ``cuda_graphs=True`` replays each decode step as a graph, as ``env-graphs`` does).
    """

    def __init__(
        self,
        setup: Setup,
        policy: nn.Module,
        reference: nn.Module,
        reward: nn.Module,
        *,
        cuda_graphs: bool = False,
    ) -> None:
        s = setup.settings
        self.setup = setup
        capacity = s.prompt_length + s.new_tokens
        self.policy = IncrementalLM(policy, s.batch_size, capacity, cuda_graph=cuda_graphs)
        self.reference = IncrementalLM(reference, s.batch_size, capacity, cuda_graph=cuda_graphs)
        self.reward = reward
        self.rows = np.arange(s.batch_size)
        self.lengths = np.full(s.batch_size, s.prompt_length)

    def __call__(self, generator: torch.Generator) -> Rollout:
        s = self.setup.settings
        prompt_ids = self.setup.prompt_ids
        shape = (s.batch_size, s.new_tokens)
        device = self.setup.device
        tokens = torch.empty(shape, dtype=torch.long, device=device)
        logprobs = torch.empty(shape, device=device)
        ref_logprobs = torch.empty(shape, device=device)
        with torch.no_grad():
            logits = self.policy.prefill(self.rows, prompt_ids, self.lengths).logits  # (B, V) float32
            ref_logits = self.reference.prefill(self.rows, prompt_ids, self.lengths).logits
            for t in range(s.new_tokens):
                logp = torch.log_softmax(logits if s.temperature == 1.0 else logits / s.temperature, dim=-1)
                token = sample_tokens(logp, generator)  # (B,)
                tokens[:, t] = token
                logprobs[:, t] = logp.gather(1, token[:, None]).squeeze(1)
                # log_softmax then gather: on CPU its fused kernel beats logit - logsumexp (composite)
                ref_logprobs[:, t] = (
                    torch.log_softmax(ref_logits, dim=-1).gather(1, token[:, None]).squeeze(1)
                )
                if t + 1 < s.new_tokens:
                    logits = self.policy.decode(token).logits
                    ref_logits = self.reference.decode(token).logits
            sequences = torch.cat([prompt_ids, tokens], dim=1)  # (B, P + N)
            scores = sequence_scores(self.reward, sequences, torch.ones_like(sequences))
            rewards = -s.kl_coef * kl_penalty(logprobs, ref_logprobs, "k1")  # (B, N) dense KL reward
            rewards[:, -1] += scores
        return Rollout(prompt_ids, tokens, ref_logprobs, scores)
