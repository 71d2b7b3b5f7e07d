"""The models every variant shares: decoder shapes with random weights (nothing is downloaded), and prompts."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llm_env.models import resolve_device, resolve_dtype
from llm_env.tiny import numbered_tokenizer, tiny_gpt2, tiny_llama

if TYPE_CHECKING:
    from rlhf_bench.throughput.settings import ThroughputSettings

__all__ = ["SHAPES", "ModelShape", "Setup", "build_model", "build_setup"]


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
    # The CPU target of the performance issue: 6 layers x 384 wide with GPT-2's vocabulary (the LM head
    # dominates).
    "gpt2-small": ModelShape("gpt2", layers=6, hidden=384, heads=6, vocab=50257),
    "gpt2-124m": ModelShape("gpt2", layers=12, hidden=768, heads=12, vocab=50257),
    # TinyLlama-1.1B's shape: 22 layers there; 16 here, as in the anchor measurements (~1B parameters).
    "llama-1b": ModelShape(
        "llama", layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=5632, vocab=32000
    ),
}


def build_model(
    shape: ModelShape, tokenizer: Any, *, seed: int, classifier: bool, max_positions: int
) -> nn.Module:
    """A causal LM (or a one-label sequence classifier) of ``shape`` on ``tokenizer``'s vocabulary, with
    random weights, frozen and in eval mode (built by :mod:`llm_env.tiny`, like every test model)."""
    if shape.arch == "gpt2":
        model = tiny_gpt2(
            tokenizer,
            n_layer=shape.layers,
            n_embd=shape.hidden,
            n_head=shape.heads,
            n_positions=max(1024, max_positions),
            seed=seed,
            classifier=classifier,
        )
    elif shape.arch == "llama":
        model = tiny_llama(
            tokenizer,
            num_hidden_layers=shape.layers,
            hidden_size=shape.hidden,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads,
            intermediate_size=shape.intermediate or 4 * shape.hidden,
            max_position_embeddings=max(2048, max_positions),
            seed=seed,
            classifier=classifier,
        )
    else:
        raise ValueError(f"unknown architecture {shape.arch!r}")
    return model.requires_grad_(False)


@dataclass
class Setup:
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
        """Tokens every rollout generates: ``batch_size * new_tokens``."""
        return self.settings.batch_size * self.settings.new_tokens


def build_setup(settings: ThroughputSettings) -> Setup:
    """Random-weight policy and reward templates of the settings' shapes, and prompts of exact length.

    The tokenizer (:func:`llm_env.tiny.numbered_tokenizer`) has exactly the shape's vocabulary and
    round-trips text, so prompts of P words are P tokens and the environment's detokenise-and-retokenise
    path for the reward model does real work on real text.
    """
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype)
    shape = SHAPES[settings.shape]
    reward_shape = SHAPES[settings.reward_shape or settings.shape]
    tokenizer = numbered_tokenizer(shape.vocab)
    positions = settings.prompt_length + settings.new_tokens + 1
    policy = build_model(shape, tokenizer, seed=settings.seed, classifier=False, max_positions=positions)
    # The reward model reads the same tokens, so it gets the policy's vocabulary whatever its shape.
    reward = build_model(
        reward_shape, tokenizer, seed=settings.seed + 1, classifier=True, max_positions=positions
    )
    policy = policy.to(device=device, dtype=dtype)
    reward = reward.to(device=device, dtype=dtype)
    rng = np.random.default_rng(settings.seed)
    # Words w3.. only: no special token inside a prompt. Enough prompts for several rounds of every row.
    ids = rng.integers(3, shape.vocab, size=(settings.batch_size * 4, settings.prompt_length))
    texts = [" ".join(f"w{i}" for i in row) for row in ids]
    prompt_ids = torch.as_tensor(ids[: settings.batch_size], dtype=torch.long, device=device)
    return Setup(settings, device, dtype, tokenizer, policy, reward, texts, prompt_ids)
