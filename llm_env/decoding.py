"""Incremental decoding of B independent sequences with a slot KV cache.

A Gym vector environment restarts each sub-environment on its own schedule: when row 3 finishes, it gets
a new prompt while rows 0-2 keep generating. Hugging Face's ``DynamicCache`` stores one shared length for
the whole batch, so a restarted row could only be served by re-encoding everybody. :class:`SlotCache`
instead gives every row its own region of a preallocated buffer, ``[offset_i, offset_i + length_i)``; a
restart overwrites one row's region, and a decode step scatters each row's new key/value at its own slot.
Attention reads the buffer through an explicit 4-D mask and explicit ``position_ids``, both of which every
decoder in transformers 5.x accepts, so this works for GPT-2, Llama and the other standard architectures
with the ``sdpa`` or ``eager`` attention implementations.

:class:`IncrementalLM` wraps a causal LM with such a cache. The environment uses it for the frozen
reference model and agents use it for the policy, so both advance by one token per step instead of
re-encoding the context (RL4LMs re-encodes, which costs 10x and more at 128 new tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from llm_env.models import accepts_kwarg, cache_kwarg, model_device, unwrap_model

__all__ = ["DecodeOutput", "IncrementalLM", "SlotCache"]


class _Plan:
    """What the next forward pass writes: set by :class:`IncrementalLM` before each call."""

    def __init__(self) -> None:
        self.prefill_rows: torch.Tensor | None = None  # (n,) rows being (re)filled, or None in decode mode
        self.write_index: torch.Tensor | None = None  # (B,) slot each row writes in decode mode
        self.kv_len: int = 0  # number of slots attention reads in decode mode


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values, ``(batch, kv_heads, capacity, head_dim)``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, batch_size: int, capacity: int, plan: _Plan) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.capacity = capacity
        self.plan = plan

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, key_dim = key_states.shape
        value_dim = value_states.shape[-1]
        self.keys = key_states.new_zeros(self.batch_size, heads, self.capacity, key_dim)
        self.values = value_states.new_zeros(self.batch_size, heads, self.capacity, value_dim)
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.plan
        if plan.prefill_rows is not None:
            # Prefill: the new rows' keys fill slots [0, P); attention reads only these fresh states.
            width = key_states.shape[2]
            self.keys[plan.prefill_rows, :, :width] = key_states
            self.values[plan.prefill_rows, :, :width] = value_states
            return key_states, value_states
        # Decode: one new key per row, written at the row's own slot.
        index = plan.write_index.view(-1, 1, 1, 1)
        self.keys.scatter_(2, index.expand(-1, key_states.shape[1], 1, key_states.shape[3]), key_states)
        self.values.scatter_(
            2, index.expand(-1, value_states.shape[1], 1, value_states.shape[3]), value_states
        )
        return self.keys[:, :, : plan.kv_len], self.values[:, :, : plan.kv_len]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.plan.kv_len, 0

    def get_seq_length(self) -> int:
        return self.plan.kv_len

    def get_max_length(self) -> int:
        return self.capacity


class SlotCache(Cache):
    """A KV cache in which each batch row owns its own slots (see the module docstring).

    It is driven by :class:`IncrementalLM`, which sets the write plan before each forward pass; using it
    with ``model.generate`` is not supported.
    """

    def __init__(self, num_layers: int, batch_size: int, capacity: int) -> None:
        self.plan = _Plan()
        super().__init__(layers=[_SlotLayer(batch_size, capacity, self.plan) for _ in range(num_layers)])


@dataclass
class DecodeOutput:
    """Next-token logits (float32) and, when asked for, the final hidden state of the last position."""

    logits: torch.Tensor  # (n, V)
    hidden: torch.Tensor | None = None  # (n, d)


def _num_layers(model: nn.Module) -> int:
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.num_hidden_layers)


class IncrementalLM:
    """Step a causal LM one token at a time over ``batch_size`` independently restartable rows.

    Args:
        model: any transformers causal LM (or a peft model wrapping one).
        batch_size: number of rows B.
        capacity: the longest sequence a row may hold (prompt + generated tokens); one spare slot is added.
        context: optional factory of a context manager entered around every forward pass, e.g.
            ``peft_model.disable_adapter`` to run a LoRA policy's base model as the reference.

    Usage::

        lm = IncrementalLM(model, batch_size=4, capacity=96)
        out = lm.prefill(rows, left_padded_ids, lengths)   # logits for the first new token of these rows
        out = lm.decode(next_tokens)                       # (B,) -> logits for the following token

    ``decode`` advances every row; rows that are about to be restarted simply get overwritten by the
    next ``prefill``. Row lengths are tracked on the host as well as on the device, so building the
    attention window never reads a value back from the GPU.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        capacity: int,
        *,
        context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        attn = getattr(unwrap_model(model).config, "_attn_implementation", None) or "sdpa"
        if "flash" in attn:
            raise ValueError(
                f"IncrementalLM needs an attention implementation that accepts 4-D masks ('sdpa' or 'eager'), "
                f"but the model uses {attn!r}; load it with attn_implementation='sdpa'"
            )
        self.model = model
        self.batch_size = int(batch_size)
        self.capacity = int(capacity) + 1  # spare slot for a decode on a row that has just finished
        self.device = model_device(model)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self._context = context or contextlib.nullcontext
        self._cache_kwarg = cache_kwarg(model)
        self._logits_to_keep = accepts_kwarg(model, "logits_to_keep")
        self.cache = SlotCache(_num_layers(model), self.batch_size, self.capacity)
        self.offset = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.length = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self._end = np.zeros(self.batch_size, dtype=np.int64)  # host mirror of offset + length
        self._slots = torch.arange(self.capacity, device=self.device)

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, hidden: bool
    ) -> Any:
        min_value = torch.finfo(self.dtype).min
        additive = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~mask, min_value
        )
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": additive,
            "position_ids": positions,
            self._cache_kwarg: self.cache,
            "use_cache": True,
            "output_hidden_states": hidden,
        }
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        was_training = self.model.training
        if was_training:
            self.model.eval()  # rollouts never use dropout
        try:
            with torch.no_grad(), self._context():
                return self.model(**kwargs)
        finally:
            if was_training:
                self.model.train()

    def prefill(
        self,
        rows: torch.Tensor | np.ndarray,
        input_ids: torch.Tensor,
        lengths: np.ndarray,
        *,
        hidden: bool = False,
    ) -> DecodeOutput:
        """(Re)start ``rows`` with left-padded prompts.

        Args:
            rows: (n,) row indices to overwrite.
            input_ids: (n, P) token ids, left-padded (each row's tokens end at column P - 1).
            lengths: (n,) host array of the number of real tokens per row.
            hidden: also return the last hidden state at the final position.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        width = input_ids.shape[1]
        if width + 1 > self.capacity:
            raise ValueError(f"prefill of {width} tokens does not fit the cache capacity {self.capacity - 1}")
        rows_t = torch.as_tensor(rows, dtype=torch.long).to(self.device)
        input_ids = input_ids.to(self.device)
        offsets = torch.as_tensor(width - lengths).to(self.device)  # (n,) first real column of each row
        cols = torch.arange(width, device=self.device)
        # (n, 1, P, P): a query attends to real keys at or before itself.
        mask = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] >= offsets[:, None, None])
        positions = (cols[None, :] - offsets[:, None]).clamp_(min=0)
        self.cache.plan.prefill_rows = rows_t
        try:
            out = self._forward(input_ids, mask[:, None], positions, hidden)
        finally:
            self.cache.plan.prefill_rows = None
        self.offset[rows_t] = offsets
        self.length[rows_t] = torch.as_tensor(lengths).to(self.device)
        self._end[np.asarray(rows)] = width
        return DecodeOutput(
            logits=out.logits[:, -1].float(),
            hidden=out.hidden_states[-1][:, -1] if hidden else None,
        )

    def decode(self, tokens: torch.Tensor, *, hidden: bool = False) -> DecodeOutput:
        """Append one token to every row and return the logits for the next one.

        Args:
            tokens: (B,) token ids on any device.
            hidden: also return the last hidden state, (B, d).
        """
        tokens = tokens.to(self.device).view(self.batch_size, 1)
        write = (self.offset + self.length).clamp_(max=self.capacity - 1)
        kv_len = int(min(self._end.max() + 1, self.capacity))
        slots = self._slots[:kv_len]
        mask = (slots[None, :] >= self.offset[:, None]) & (slots[None, :] <= write[:, None])  # (B, kv_len)
        plan = self.cache.plan
        plan.write_index, plan.kv_len = write, kv_len
        out = self._forward(tokens, mask[:, None, None, :], self.length[:, None], hidden)
        self.length += 1
        np.minimum(self._end + 1, self.capacity - 1, out=self._end)
        return DecodeOutput(
            logits=out.logits[:, -1].float(),
            hidden=out.hidden_states[-1][:, -1] if hidden else None,
        )


def left_pad(
    sequences: list[np.ndarray], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, np.ndarray]:
    """Stack token arrays into a left-padded ``(n, max_len)`` tensor; also return the lengths."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max())
    out = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for i, seq in enumerate(sequences):
        out[i, width - len(seq) :] = seq
    return torch.from_numpy(out).to(device), lengths
