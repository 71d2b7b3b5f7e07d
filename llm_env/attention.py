"""Which attention each layer of a causal LM computes, and the masks that reproduce it over a slot cache.

The slot KV cache (:class:`llm_env.IncrementalLM`) hands the model an explicit attention mask, so the
model cannot build its own, and every restriction the model would have put in that mask has to be put
there by us. Since transformers 4.53 a model declares the attention of each layer in
``config.layer_types``; the two kinds a KV cache can serve exactly are

* ``"full_attention"``: a token attends to every earlier token of its sequence, and
* ``"sliding_attention"``: only to the last ``config.sliding_window`` positions, itself included
  (``q - k < window``, transformers' ``sliding_window_overlay``). Mistral, Mixtral, Phi-3 and Starcoder2
  slide on every layer (their configs have no ``layer_types``, only a ``sliding_window``); Gemma 2 and 3,
  Cohere 2, GPT-OSS, OLMo 3 and Qwen2 with ``use_sliding_window`` alternate local and global layers.

A model whose layers are all of one kind takes one 4-D mask; one that mixes them takes a dict
``{layer_type: mask}`` (its forward's ``causal_mask_mapping``). Anything else (linear-attention or
state-space layers of hybrid models, chunked attention, ALiBi biases computed from a 2-D mask, layers that
share another layer's cache) cannot be decoded exactly by a slot cache, and :func:`attention_layout`
refuses such a model when the cache is built, naming the architecture and the feature, rather than
return log-probabilities that are silently wrong.

Why it matters: Gemma 3 has a 1,024-token local window on five layers of six. Without the window in the
mask, every token past the 1,024th of a reasoning response attends to keys the model never saw together,
and the reference log-probabilities, hence the KL penalty, are wrong by 0.01 to 0.1 nats per token.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from llm_env.models import accepts_kwarg, unwrap_model

__all__ = ["FULL", "SLIDING", "AttentionLayout", "UnsupportedArchitectureError", "attention_layout"]

FULL = "full_attention"
"""``config.layer_types`` entry of a layer that attends to every earlier token of its sequence."""
SLIDING = "sliding_attention"
"""``config.layer_types`` entry of a layer that attends only to the last ``config.sliding_window``
positions."""


class UnsupportedArchitectureError(ValueError):
    """A model whose attention the slot KV cache cannot reproduce exactly (see :func:`attention_layout`)."""


@dataclass(frozen=True)
class AttentionLayout:
    """The attention kinds of a model's layers and how its forward takes their masks.

    Attributes:
        kinds: the distinct layer types, in order of first appearance (``FULL`` and/or ``SLIDING``).
        window: ``config.sliding_window`` when a layer slides, else None.
        mapping: the forward takes ``attention_mask`` as a dict keyed by layer type (True whenever the
            kinds differ from layer to layer).
    """

    kinds: tuple[str, ...]
    window: int | None = None
    mapping: bool = False

    def masks(
        self, allowed: torch.Tensor, distance: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The additive masks of one forward pass.

        Args:
            allowed: bool, broadcastable to ``(n, 1, q, k)``: key k holds a real token of the query's own
                sequence at or before it (causality and padding).
            distance: integer, broadcastable to ``allowed``: the query's position minus the key's.
            dtype: the model's compute dtype (the mask holds 0 or its most negative finite value).
        """
        out = {}
        for kind in self.kinds:
            keep = allowed if kind == FULL else allowed & (distance < self.window)
            out[kind] = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(
                ~keep, torch.finfo(dtype).min
            )
        return out if self.mapping else out[self.kinds[0]]


def _config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@functools.lru_cache(maxsize=64)
def _decoder_source(cls: type) -> str:
    """The source of the forward of a causal LM's decoder class, or "" when it is not available."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _decoder(model: nn.Module) -> nn.Module:
    base = unwrap_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError):
        decoder = None
    return decoder if isinstance(decoder, nn.Module) else getattr(base, "base_model", base)


def attention_layout(model: nn.Module) -> AttentionLayout:
    """The :class:`AttentionLayout` of ``model``, or :class:`UnsupportedArchitectureError` if a slot KV cache
    cannot decode it exactly.

    The layer kinds come from ``config.layer_types`` when the config has them; otherwise every layer
    slides when ``config.sliding_window`` is set and the model's forward builds a sliding-window mask
    (``create_sliding_window_causal_mask``), and attends fully when not.
    """
    base = unwrap_model(model)
    config = _config(model)
    name = f"{type(base).__name__} (model_type {getattr(config, 'model_type', '?')!r})"

    def refuse(feature: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"{name}: {feature}; the slot KV cache that decodes the reference and the policy one token at a "
            "time cannot reproduce this model's log-probabilities exactly, so it is refused rather than run "
            "wrong"
        )

    if getattr(config, "is_encoder_decoder", False):
        raise refuse("an encoder-decoder model is not a causal LM")
    if getattr(config, "alibi", False) or getattr(config, "model_type", None) in ("bloom", "mpt"):
        raise refuse("ALiBi position biases are computed from a 2-D attention mask, which the cache replaces")
    if not accepts_kwarg(model, "position_ids"):
        raise refuse("its forward takes no position_ids, so a row's positions cannot follow its own length")
    if getattr(config, "num_kv_shared_layers", 0):
        raise refuse("layers that read another layer's keys and values (num_kv_shared_layers)")
    if getattr(config, "attention_chunk_size", None):
        raise refuse("chunked attention (attention_chunk_size)")

    window = getattr(config, "sliding_window", None)
    window = int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    source = _decoder_source(type(_decoder(model)))
    layer_types = getattr(config, "layer_types", None)
    kinds = tuple(dict.fromkeys(layer_types or ()))
    other = [kind for kind in kinds if kind not in (FULL, SLIDING)]
    if other:
        raise refuse(f"layers of type {', '.join(map(repr, other))} (config.layer_types)")
    if SLIDING in kinds and window is None:
        raise refuse("sliding-attention layers without a config.sliding_window")
    if kinds and "causal_mask_mapping" in source:  # the forward picks each layer's mask by its type
        return AttentionLayout(kinds, window if SLIDING in kinds else None, mapping=True)
    # One mask for every layer, built as Mistral's forward builds it: sliding when a window is set.
    kind = SLIDING if window is not None and "create_sliding_window_causal_mask" in source else FULL
    if kinds and kinds != (kind,):
        raise refuse(
            f"config.layer_types says {list(kinds)} but the forward builds one {kind!r} mask for every layer"
        )
    return AttentionLayout((kind,), window if kind == SLIDING else None)
