"""``llm-env bench-throughput``: does the Gym API cost anything? Rollout throughput, side by side.

The promise of this project is that stepping :class:`~llm_env.TextGenVectorEnv` token by token is not
slower than the monolithic rollout RLHF libraries use. This benchmark measures it in one process, on the
same randomly initialised models (built from configs, nothing is downloaded), batch and lengths:

======================  ====================================================================================
``generate``            (a) the policy's Hugging Face ``generate`` alone (sampling, no log-probabilities).
``monolithic``          (b) the TRL-style rollout: ``generate`` (recording the sampled tokens'
                        log-probabilities), then one reference forward over the whole batch for the
                        reference log-probabilities of the generated tokens, the per-token KL reward, and
                        one reward-model forward.
``monolithic-greedy``   (b0) as (b) with greedy decoding: generate without sampling, an upper bound of the
                        baseline's speed (Hugging Face samples with ``torch.multinomial``, which costs ~12
                        ms per step on 2 CPU cores at V = 50257, more than the environment agents' sampler).
``env``                 (c) :class:`agents.PPOAgent` (full fine-tune, separate frozen reference copy)
                        through ``TextGenVectorEnv`` with :func:`agents.collect_episodes`: dense per-token
                        KL reward computed by the environment, reward model scoring the finished responses.
``monolithic-lora``     (b') as (b) with a LoRA policy and its base (adapter disabled) as the reference.
``env-lora``            (c') as (c) with a LoRA policy and ``AdapterDisabled(policy)`` as the reference.
``env-fused``           (c'') as (c') with ``AdapterDisabled(policy, fuse=True)``: policy and reference rows
                        decoded in one forward pass (see :class:`llm_env.decoding.FusedDecoder`).
``env-graphs``          (c, CUDA only) as (c) with ``cuda_graphs``: the agent's and the reference's decode
                        steps replayed as CUDA graphs (see :class:`llm_env.IncrementalLM`).
``env-fused-graphs``    (c'', CUDA only) as (c'') with the fused decode step replayed as a CUDA graph.
``no-cache``            (d) RL4LMs-style: every step re-encodes the whole sequence with the policy and the
                        reference (no KV cache; only the last position's logits are computed).
``ppo-update``          PPO update throughput (tokens per second per optimisation epoch) of the full and the
                        LoRA agent on the episodes of one rollout.
``lora-memory``         peak memory of a LoRA policy alone, with its adapter-disabled reference, and with a
                        separate reference copy (one rollout and one PPO update each).
======================  ====================================================================================

All variants generate exactly ``batch_size * new_tokens`` tokens: ``generate`` gets
``min_new_tokens=max_new_tokens`` and the environments ``stop_token_ids=[]`` (no stop token), so the
counts and the work are identical. Throughput is generated tokens per second, the median over
``--repeats`` timed runs after ``--warmup`` untimed runs; the repetitions of all variants are interleaved
(round-robin) so that a change of machine load affects them alike, and the ratios are computed from
medians measured in the same process.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the warm-up run minus the allocation
before the variant built its models (so it includes the variant's models, caches and activations); on
CPU, the kernel's high-water mark of the process's resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before the run) minus the RSS before the variant built its models. CPU
allocators keep freed memory, so RSS depends on what ran before: the LoRA memory comparison therefore
runs each of its setups in a fresh process on CPU (``memory_isolation``).

Usage::

    llm-env bench-throughput --shape gpt2-small --batch-size 16 --prompt-length 32 --new-tokens 48 \\
        --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = ["SHAPES", "VARIANTS", "ModelShape", "ThroughputSettings", "add_parser", "run_benchmark"]


# ------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """A decoder shape; models are built from it with random weights (no download)."""

    arch: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    heads: int
    vocab: int
    kv_heads: int | None = None  # GQA (llama)
    intermediate: int | None = None  # MLP width (llama; GPT-2 uses 4 * hidden)


SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape("gpt2", layers=2, hidden=64, heads=4, vocab=512),
    # The CPU target of the issue: 6 layers x 384 wide with GPT-2's vocabulary (the LM head dominates).
    "gpt2-small": ModelShape("gpt2", layers=6, hidden=384, heads=6, vocab=50257),
    "gpt2-124m": ModelShape("gpt2", layers=12, hidden=768, heads=12, vocab=50257),
    # TinyLlama-1.1B's shape: 22 layers there; 16 here, as in the measurements (~1B parameters).
    "llama-1b": ModelShape(
        "llama", layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=5632, vocab=32000
    ),
}

ROLLOUT_VARIANTS = (
    "generate",
    "monolithic",
    "monolithic-greedy",
    "env",
    "monolithic-lora",
    "env-lora",
    "env-fused",
    "env-graphs",
    "env-fused-graphs",
    "no-cache",
)
CUDA_ONLY = ("env-graphs", "env-fused-graphs")
VARIANTS = (*ROLLOUT_VARIANTS, "ppo-update", "lora-memory")
# (numerator, denominator, name) of the reported ratios; a ratio is reported when both variants ran.
RATIOS = (
    ("env", "monolithic", "c/b"),
    ("env", "generate", "c/a"),
    ("env", "no-cache", "c/d"),
    ("env", "monolithic-greedy", "c/b_greedy"),
    ("env-lora", "monolithic-lora", "c_lora/b_lora"),
    ("env-fused", "monolithic-lora", "c_fused/b_lora"),
    ("env-fused", "monolithic", "c_fused/b"),
    ("env-fused", "generate", "c_fused/a"),
    ("env-fused", "monolithic-greedy", "c_fused/b_greedy"),
    ("env-fused", "no-cache", "c_fused/d"),
    ("env-graphs", "monolithic", "c_graphs/b"),
    ("env-graphs", "no-cache", "c_graphs/d"),
    ("env-fused-graphs", "monolithic-lora", "c_fused_graphs/b_lora"),
    ("env-fused-graphs", "monolithic", "c_fused_graphs/b"),
)


ShapeName = Literal["tiny", "gpt2-small", "gpt2-124m", "llama-1b"]
DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclass
class ThroughputSettings:
    """Options of the benchmark; ``llm-env bench-throughput`` has one flag per field."""

    shape: ShapeName = "gpt2-small"
    """Policy and reference shape (random weights): tiny, gpt2-small (6 x 384, vocab 50257), gpt2-124m
    (12 x 768), llama-1b (16 x 2048, GQA 32/8 heads, MLP 5632, vocab 32000)."""
    reward_shape: ShapeName | None = None
    """Shape of the reward model (a sequence classifier on the policy's vocabulary); default: ``shape``."""
    batch_size: int = 16
    """B: episodes generated in parallel."""
    prompt_length: int = 32
    """Prompt tokens per episode (every prompt has exactly this length)."""
    new_tokens: int = 48
    """Generated tokens per episode (exactly: no stop token)."""
    dtype: DTypeName = "float32"
    """Model dtype (bfloat16 on GPUs)."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto."""
    repeats: int = 3
    """Timed runs per variant; the median is reported."""
    warmup: int = 1
    """Untimed runs per variant before the timed ones (the first one also measures peak memory)."""
    no_cache_repeats: int = 1
    """Timed runs of the slow no-cache variant; with 1 it has no warm-up run either."""
    threads: int | None = 2
    """torch.set_num_threads for the run; none keeps PyTorch's default."""
    variants: tuple[str, ...] | None = None
    """Which variants run (space- or comma-separated); default: all, less the CUDA-graph ones on CPU."""
    temperature: float = 1.0
    """Sampling temperature of every variant."""
    kl_coef: float = 0.05
    """beta of the per-token KL reward."""
    lora_rank: int = 16
    """Rank of the LoRA variants' adapters (on all linear layers)."""
    ppo_epochs: int = 1
    """PPO epochs per update in the ppo-update measurement."""
    seed: int = 0
    """Seed of the weights, the prompts and sampling."""
    memory_isolation: bool = True
    """On CPU, measure each setup of the lora-memory comparison in a fresh process."""

    def __post_init__(self) -> None:
        if self.variants is None:
            return self._check()
        variants = tuple(v.strip() for item in self.variants for v in str(item).split(",") if v.strip())
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        if not variants:
            raise ValueError(f"choose at least one variant from {', '.join(VARIANTS)}")
        self.variants = tuple(v for v in VARIANTS if v in variants)  # canonical order
        self._check()

    def _check(self) -> None:
        for name in ("shape", "reward_shape"):
            value = getattr(self, name)
            if value is not None and value not in SHAPES:
                raise ValueError(f"{name} must be one of {', '.join(SHAPES)}, got {value!r}")
        for name in (
            "batch_size",
            "prompt_length",
            "new_tokens",
            "repeats",
            "no_cache_repeats",
            "ppo_epochs",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        lora = {"monolithic-lora", "env-lora", "env-fused", "env-fused-graphs", "ppo-update", "lora-memory"}
        if self.lora_rank < 1 and lora & set(self.variants or VARIANTS):
            raise ValueError("the LoRA variants need lora_rank >= 1")


# --------------------------------------------------------------------------------------- building
def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer with exactly ``vocab_size`` tokens (:func:`llm_env.tiny.numbered_tokenizer`).

    Text round-trips exactly (words are joined by single spaces), so prompts of P words are P tokens and
    the environment's detokenise-and-retokenise path for the reward model does real work on real text.
    """
    from llm_env.tiny import numbered_tokenizer

    return numbered_tokenizer(vocab_size)


def build_model(
    shape: ModelShape, *, vocab: int, seed: int, classifier: bool, max_positions: int
) -> nn.Module:
    """A causal LM (or a one-label sequence classifier) of ``shape`` with random weights, in eval mode."""
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
    )

    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
    torch.manual_seed(seed)
    if shape.arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_layer=shape.layers,
            n_embd=shape.hidden,
            n_head=shape.heads,
            n_positions=max(1024, max_positions),
            num_labels=1,
            attn_implementation="sdpa",
            **ids,
        )
        cls = GPT2ForSequenceClassification if classifier else GPT2LMHeadModel
    elif shape.arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate or 4 * shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads,
            max_position_embeddings=max(2048, max_positions),
            num_labels=1,
            attn_implementation="sdpa",
            **ids,
        )
        cls = LlamaForSequenceClassification if classifier else LlamaForCausalLM
    else:
        raise ValueError(f"unknown architecture {shape.arch!r}")
    return cls(config).eval().requires_grad_(False)


@dataclass
class _Setup:
    """Everything the variants share: templates of the models (copied per variant), prompts, settings."""

    settings: ThroughputSettings
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    policy: nn.Module  # template, never run itself
    reward: nn.Module  # template
    prompt_texts: list[str]
    prompt_ids: torch.Tensor  # (B, P) on the device

    def copy(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    @property
    def tokens(self) -> int:
        return self.settings.batch_size * self.settings.new_tokens


def _build_setup(settings: ThroughputSettings) -> _Setup:
    from llm_env.models import resolve_device, resolve_dtype

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype)
    shape = SHAPES[settings.shape]
    reward_shape = SHAPES[settings.reward_shape or settings.shape]
    tokenizer = synthetic_tokenizer(shape.vocab)
    positions = settings.prompt_length + settings.new_tokens + 1
    policy = build_model(
        shape, vocab=shape.vocab, seed=settings.seed, classifier=False, max_positions=positions
    )
    # The reward model reads the same tokens, so it gets the policy's vocabulary whatever its shape.
    reward = build_model(
        reward_shape, vocab=shape.vocab, seed=settings.seed + 1, classifier=True, max_positions=positions
    )
    policy = policy.to(device=device, dtype=dtype)
    reward = reward.to(device=device, dtype=dtype)
    rng = np.random.default_rng(settings.seed)
    # Words w3.. only: no special token inside a prompt. Enough prompts for several rounds of every row.
    ids = rng.integers(3, shape.vocab, size=(settings.batch_size * 4, settings.prompt_length))
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    prompt_ids = torch.as_tensor(ids[: settings.batch_size], dtype=torch.long, device=device)
    return _Setup(settings, device, dtype, tokenizer, policy, reward, texts, prompt_ids)


# ---------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark, which cannot be reset
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _release_memory(device: torch.device) -> None:
    """Return freed memory to the OS / the CUDA allocator so that baselines are comparable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of our resident set size (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    """VmHWM: the peak resident set size since the last :func:`_reset_peak_rss`, in bytes."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus the allocation before the variant's models"
    return "peak resident set size (the kernel's VmHWM) minus the RSS before the variant's models"


class _MemoryTracker:
    """Peak memory above a baseline taken at construction (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _release_memory(device)
        if device.type == "cuda":
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            self.baseline = _rss_bytes()
        self.peak = self.baseline

    @property
    def measure(self) -> str:
        return _memory_measure(self.device)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Record the peak during the ``with`` block."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        if _reset_peak_rss():  # exact: the kernel keeps the high-water mark
            try:
                yield
            finally:
                self.peak = max(self.peak, _peak_rss() or 0)
            return
        stop = threading.Event()

        def sample() -> None:  # elsewhere: poll the resident set size
            while not stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                stop.wait(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        return int(self.peak - self.baseline)


def _model_bytes(*models: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``models`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------------------------- variants
class _LogprobRecorder:
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


def _generate(
    model: nn.Module, setup: _Setup, recorder: _LogprobRecorder | None = None, *, sample: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample ``new_tokens`` tokens for every prompt; returns the (B, P + N) sequences (and log-probs)."""
    from transformers import LogitsProcessorList

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


def _reference_logprobs(model: nn.Module, sequences: torch.Tensor, prompt_length: int) -> torch.Tensor:
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


def _monolithic(
    setup: _Setup,
    policy: nn.Module,
    reference: nn.Module,
    reward: nn.Module,
    context: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    sample: bool = True,
) -> int:
    """(b): generate + one reference forward + one reward-model forward; returns generated tokens."""
    from llm_env.core import kl_penalty
    from llm_env.reward import sequence_scores

    s = setup.settings
    recorder = _LogprobRecorder()
    with torch.no_grad():
        sequences, logprobs = _generate(policy, setup, recorder, sample=sample)
        with context():
            ref_logprobs = _reference_logprobs(reference, sequences, s.prompt_length)
        rewards = -s.kl_coef * kl_penalty(logprobs, ref_logprobs, "k1")  # (B, N) dense KL reward
        scores = sequence_scores(reward, sequences, torch.ones_like(sequences))
        rewards[:, -1] += scores
    return int(sequences[:, s.prompt_length :].numel())


def _no_cache(setup: _Setup, policy: nn.Module, reference: nn.Module, reward: nn.Module) -> int:
    """(d): each step re-encodes the whole sequence with the policy and the reference (RL4LMs-style).

    Only the last position goes through the LM head and sampling is the environment agents' own
    (:func:`agents.policy.sample_tokens`), so the difference to (c) is the missing KV cache alone.
    """
    from agents.policy import sample_tokens
    from llm_env.core import kl_penalty
    from llm_env.reward import sequence_scores

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


def _ppo_agent(
    setup: _Setup, policy: nn.Module, *, lora: bool, reference: Any = None, cuda_graphs: bool = False
) -> Any:
    from agents.ppo import PPOAgent, PPOConfig

    s = setup.settings
    if not lora:  # a full fine-tune trains every weight (the templates are built frozen)
        policy.requires_grad_(True)
    config = PPOConfig(
        temperature=s.temperature,
        kl_coef=s.kl_coef,
        lora_rank=s.lora_rank if lora else 0,
        episodes_per_update=s.batch_size,
        minibatch_size=math.gcd(s.batch_size, 16),  # bounded activations: <= 16 episodes per step
        ppo_epochs=s.ppo_epochs,
        seed=s.seed,
        progress=False,
        cuda_graphs=cuda_graphs,
    )
    return PPOAgent(policy, setup.tokenizer, config, reference=reference, device=setup.device)


def _env(setup: _Setup, reference: Any, reward: Any, *, cuda_graphs: bool = False) -> Any:
    from llm_env import TextGenVectorEnv

    s = setup.settings
    return TextGenVectorEnv(
        num_envs=s.batch_size,
        prompts=setup.prompt_texts,
        tokenizer=setup.tokenizer,
        reward=reward,
        reward_tokenizer=setup.tokenizer,
        reward_batch_size=s.batch_size,
        reference=reference,
        kl_coef=s.kl_coef if reference is not None else 0.0,
        max_new_tokens=s.new_tokens,
        max_prompt_length=s.prompt_length,
        stop_token_ids=[],  # no stop token: every episode has exactly new_tokens tokens
        device=setup.device,
        cuda_graphs=cuda_graphs,
    )


def _env_rollout(env: Any, agent: Any, setup: _Setup, seed: int) -> Any:
    from agents.rollout import collect_episodes

    trajectories = collect_episodes(env, agent, setup.settings.batch_size, seed=seed)
    if int(trajectories.lengths.sum()) != setup.tokens:
        raise RuntimeError(
            f"the environment generated {int(trajectories.lengths.sum())} tokens, not {setup.tokens}"
        )
    return trajectories


@dataclass
class _Variant:
    """A built variant: ``run(repetition)`` performs one rollout and returns the generated token count."""

    name: str
    run: Callable[[int], int]
    model_bytes: int
    keep: list[Any] = field(default_factory=list)  # objects that must live as long as the variant


def _build_variant(name: str, setup: _Setup) -> _Variant:
    from llm_env import AdapterDisabled

    s = setup.settings
    policy = setup.copy(setup.policy)
    reward = setup.copy(setup.reward)
    nullcontext = contextlib.nullcontext

    if name in ("generate", "monolithic", "monolithic-greedy", "no-cache"):
        reference = setup.copy(setup.policy)

        def run(rep: int) -> int:
            torch.manual_seed(s.seed + rep)
            if name == "generate":
                with torch.no_grad():
                    return int(_generate(policy, setup)[0][:, s.prompt_length :].numel())
            if name in ("monolithic", "monolithic-greedy"):
                return _monolithic(setup, policy, reference, reward, nullcontext, sample=name == "monolithic")
            return _no_cache(setup, policy, reference, reward)

        models = [policy] if name == "generate" else [policy, reference, reward]
        return _Variant(name, run, _model_bytes(*models))

    if name == "monolithic-lora":
        from agents.policy import add_lora

        policy = add_lora(policy, rank=s.lora_rank).eval()

        def run(rep: int) -> int:
            torch.manual_seed(s.seed + rep)
            return _monolithic(setup, policy, policy, reward, policy.disable_adapter)

        return _Variant(name, run, _model_bytes(policy, reward))

    if name in ("env", "env-lora", "env-fused", "env-graphs", "env-fused-graphs"):
        lora = name in ("env-lora", "env-fused", "env-fused-graphs")
        fused = name in ("env-fused", "env-fused-graphs")
        graphs = name in CUDA_ONLY
        agent = _ppo_agent(setup, policy, lora=lora, cuda_graphs=graphs)
        if lora:  # explicit, so env-lora stays unfused whatever PPOConfig.fuse_reference defaults to
            reference = AdapterDisabled(agent.policy, fuse=fused)
        else:
            reference = agent.reference
        env = _env(setup, reference, reward, cuda_graphs=graphs)
        ref_model = agent.policy if lora else agent.reference

        def run(rep: int) -> int:
            return int(_env_rollout(env, agent, setup, seed=s.seed + rep).lengths.sum())

        return _Variant(name, run, _model_bytes(agent.policy, ref_model, reward), keep=[agent, env])
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ROLLOUT_VARIANTS)}")


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None where /proc is missing."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        with open("/proc/self/stat") as handle:
            own = handle.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    return busy, int(own[11]) + int(own[12])  # utime + stime of all our threads


def _other_load(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float:
    """CPU cores used by other processes during a run: a warning sign for the timing on a shared machine."""
    if before is None or after is None or seconds <= 0:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / ticks / seconds)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[int], int], rep: int, device: torch.device) -> tuple[float, int, float]:
    """(seconds, generated tokens, CPU cores used by other processes meanwhile) of one run."""
    _sync(device)
    before = _cpu_jiffies()
    start = time.perf_counter()
    tokens = run(rep)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, tokens, _other_load(before, _cpu_jiffies(), seconds)


def _rollouts(setup: _Setup, names: Sequence[str], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Build every rollout variant (measuring its memory in its first run), then time them round-robin."""
    s = setup.settings
    built: dict[str, _Variant] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        tracker = _MemoryTracker(setup.device)
        variant = _build_variant(name, setup)
        warmup = 0 if (name == "no-cache" and s.no_cache_repeats == 1) else s.warmup
        timings: list[float] = []
        loads: list[float] = []
        with tracker.track():
            seconds, _, load = _timed(variant.run, 10_000, setup.device)  # untimed unless the only run
        if warmup == 0:
            timings.append(seconds)
            loads.append(load)
        for rep in range(1, warmup):
            variant.run(10_000 + rep)
        built[name] = variant
        results[name] = {
            "seconds": timings,
            "other_load": loads,
            "model_bytes": variant.model_bytes,
            "peak_memory_bytes": tracker.increase,
            "memory_measure": tracker.measure,
        }
        log(f"built {name}: peak memory {tracker.increase / 2**20:.0f} MiB")
    for rep in range(max(s.repeats, s.no_cache_repeats)):
        for name, variant in built.items():
            wanted = s.no_cache_repeats if name == "no-cache" else s.repeats
            if len(results[name]["seconds"]) >= wanted:
                continue
            seconds, tokens, load = _timed(variant.run, rep, setup.device)
            if tokens != setup.tokens:
                raise RuntimeError(f"{name} generated {tokens} tokens, expected {setup.tokens}")
            results[name]["seconds"].append(seconds)
            results[name]["other_load"].append(load)
            log(f"{name} run {rep + 1}: {tokens / seconds:,.0f} tokens/s (other processes: {load:.2f} cores)")
    for result in results.values():
        median = statistics.median(result["seconds"])
        result.update(tokens=setup.tokens, median_seconds=median, tokens_per_s=setup.tokens / median)
    built.clear()
    _release_memory(setup.device)
    return results


def _ppo_update(setup: _Setup, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokens per second per PPO epoch of the full and the LoRA agent, on one rollout's episodes."""
    s = setup.settings
    out: dict[str, Any] = {}
    for label, lora in (("full", False), ("lora", True)):
        agent = _ppo_agent(setup, setup.copy(setup.policy), lora=lora)
        env = _env(setup, agent.reference, setup.copy(setup.reward))
        trajectories = _env_rollout(env, agent, setup, seed=s.seed)
        timings = []
        for _ in range(max(1, s.warmup) + s.repeats):
            _sync(setup.device)
            start = time.perf_counter()
            agent.learn(trajectories)
            _sync(setup.device)
            timings.append(time.perf_counter() - start)
        timings = timings[max(1, s.warmup) :]
        median = statistics.median(timings)
        tokens = int(trajectories.lengths.sum())
        out[label] = {
            "tokens": tokens,
            "ppo_epochs": s.ppo_epochs,
            "seconds": timings,
            "tokens_per_s_per_epoch": tokens * s.ppo_epochs / median,
        }
        log(f"ppo-update {label}: {out[label]['tokens_per_s_per_epoch']:,.0f} tokens/s per epoch")
        del agent, env, trajectories
        _release_memory(setup.device)
    return out


def _zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [0.0] * len(responses)


MEMORY_SETUPS = ("policy_alone", "adapter_disabled_reference", "fused_reference", "separate_reference")


def _lora_memory_setup(setup: _Setup, label: str) -> dict[str, Any]:
    """Peak memory of one rollout + one PPO update of a LoRA agent with the reference ``label``.

    The reward is a constant callable, so that the numbers compare the policy and its reference only.
    """
    from llm_env import AdapterDisabled

    tracker = _MemoryTracker(setup.device)
    base = setup.copy(setup.policy)
    separate = setup.copy(setup.policy) if label == "separate_reference" else None
    agent = _ppo_agent(setup, base, lora=True, reference=separate)
    reference = {
        "policy_alone": None,
        "adapter_disabled_reference": AdapterDisabled(agent.policy),
        "fused_reference": AdapterDisabled(agent.policy, fuse=True),
        "separate_reference": separate,
    }[label]
    with tracker.track():
        env = _env(setup, reference, _zero_reward)
        trajectories = _env_rollout(env, agent, setup, seed=setup.settings.seed)
        agent.learn(trajectories)
    models = [agent.policy, agent.value_head] + ([separate] if separate is not None else [])
    result = {"peak_memory_bytes": tracker.increase, "model_bytes": _model_bytes(*models)}
    del agent, env, trajectories, base, separate, reference
    _release_memory(setup.device)
    return result


def _lora_memory_child(settings: dict[str, Any], label: str) -> dict[str, Any]:
    """:func:`_lora_memory_setup` in a fresh process (the entry point of the spawned child)."""
    settings = ThroughputSettings(**settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    return _lora_memory_setup(_build_setup(settings), label)


def _lora_memory(setup: _Setup, log: Callable[[str], None]) -> dict[str, Any]:
    """LoRA policy alone / + adapter-disabled reference / + fused reference / + separate copy."""
    isolate = setup.device.type == "cpu" and setup.settings.memory_isolation
    out: dict[str, Any] = {}
    for label in MEMORY_SETUPS:
        if isolate:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(1) as pool:
                out[label] = pool.apply(_lora_memory_child, (asdict(setup.settings), label))
        else:
            out[label] = _lora_memory_setup(setup, label)
        log(f"lora-memory {label}: peak {out[label]['peak_memory_bytes'] / 2**20:.0f} MiB")
    alone = out["policy_alone"]["peak_memory_bytes"]
    for label in MEMORY_SETUPS[1:]:
        out[label]["ratio_to_policy_alone"] = out[label]["peak_memory_bytes"] / max(alone, 1)
    out["memory_measure"] = _memory_measure(setup.device) + (
        " (each setup in a fresh process)" if isolate else ""
    )
    return out


# ---------------------------------------------------------------------------------------- report
def _environment(device: torch.device) -> dict[str, Any]:
    import gymnasium
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gymnasium": gymnasium.__version__,
        "numpy": np.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_benchmark(
    settings: ThroughputSettings, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the selected variants and return the report (what ``--json`` writes)."""
    log = log or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        setup = _build_setup(settings)
        variants = settings.variants
        if variants is None:  # all that apply to the device
            variants = tuple(v for v in VARIANTS if setup.device.type == "cuda" or v not in CUDA_ONLY)
        elif setup.device.type != "cuda" and set(variants) & set(CUDA_ONLY):
            raise ValueError(f"{', '.join(CUDA_ONLY)} need a CUDA device")
        report: dict[str, Any] = {
            "settings": {**asdict(settings), "variants": list(variants)},
            "environment": _environment(setup.device),
            "variants": {},
            "ratios": {},
        }
        rollouts = [name for name in ROLLOUT_VARIANTS if name in variants]
        if rollouts:
            report["variants"] = _rollouts(setup, rollouts, log)
        speed = {name: result["tokens_per_s"] for name, result in report["variants"].items()}
        for numerator, denominator, label in RATIOS:
            if numerator in speed and denominator in speed:
                report["ratios"][label] = speed[numerator] / speed[denominator]
        if "ppo-update" in variants:
            report["ppo_update"] = _ppo_update(setup, log)
        if "lora-memory" in variants:
            report["lora_memory"] = _lora_memory(setup, log)
    finally:
        torch.set_num_threads(previous_threads)
    loads = [x for r in report["variants"].values() for x in r["other_load"] if x == x]  # skip NaN
    report["max_other_load"] = max(loads, default=float("nan"))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    s = report["settings"]
    env = report["environment"]
    where = env.get("gpu", env["cpu"])
    lines = [
        f"{s['shape']} shape, batch {s['batch_size']}, prompt {s['prompt_length']}, {s['new_tokens']} new tokens, "
        f"{s['dtype']}, {where} ({env['device']}, {env['torch_threads']} threads); "
        f"median of {s['repeats']} timed runs ({s['no_cache_repeats']} for no-cache)",
    ]
    if report["variants"]:
        lines += [
            "",
            "| variant | tokens/s | median s | peak memory (MiB) | weights (MiB) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in report["variants"].items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['median_seconds']:.3f} | "
                f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['model_bytes'] / 2**20:,.0f} |"
            )
    if report["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {label} | {value:.2f} |" for label, value in report["ratios"].items()]
    if "ppo_update" in report:
        lines += ["", "| PPO update | tokens/s per epoch |", "|---|---:|"]
        lines += [f"| {k} | {v['tokens_per_s_per_epoch']:,.0f} |" for k, v in report["ppo_update"].items()]
    if "lora_memory" in report:
        lines += [
            "",
            "| LoRA memory (rollout + update) | peak (MiB) | vs policy alone | weights (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for label, v in report["lora_memory"].items():
            if isinstance(v, dict):
                lines.append(
                    f"| {label} | {v['peak_memory_bytes'] / 2**20:,.0f} | "
                    f"{v.get('ratio_to_policy_alone', 1.0):.2f} | {v['model_bytes'] / 2**20:,.0f} |"
                )
    load = report.get("max_other_load", float("nan"))
    if load == load and load > 0.2:
        lines += ["", f"WARNING: other processes used up to {load:.1f} CPU cores during a timed run."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    """Register ``llm-env bench-throughput`` (one flag per :class:`ThroughputSettings` field)."""
    from llm_env.config_cli import add_dataclass_arguments

    parser = subparsers.add_parser(
        "bench-throughput",
        help="rollout throughput: the Gym-API env vs generate, the monolithic pipeline and no cache",
        description=__doc__.split("\n\n")[0],
    )
    add_dataclass_arguments(parser, ThroughputSettings)
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    import sys

    from llm_env.config_cli import dataclass_from_args

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        settings = dataclass_from_args(ThroughputSettings, args)
        report = run_benchmark(settings, log=log)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["command"] = "llm-env " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("llm-env") else None
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0
