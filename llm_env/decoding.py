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
:class:`llm_env.fused.FusedDecoder` runs a LoRA policy and its adapter-disabled reference as the two halves
of one such cache, so that a single forward pass per step serves both the agent and the environment.

The mask also carries what the model's own mask would: the sliding window of local-attention layers
(Mistral, Gemma 2/3, Qwen2 with ``use_sliding_window``), one mask per layer type when the types differ
(:mod:`llm_env.attention`). Architectures it cannot reproduce exactly are refused when the cache is built.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from llm_env.attention import UnsupportedArchitectureError, attention_layout
from llm_env.models import accepts_kwarg, cache_kwarg, model_context_length, model_device, unwrap_model

__all__ = [
    "DecodeOutput",
    "IncrementalLM",
    "SlotCache",
    "host_to_device",
]


def host_to_device(array: np.ndarray | Any, device: torch.device) -> torch.Tensor:
    """A numpy array as a tensor on ``device``, without a stream synchronisation on CUDA.

    Why: ``tensor.to("cuda")`` from ordinary (pageable) memory makes PyTorch wait for the stream after the
    copy, so every such copy in a step stalls the CPU until the GPU has drained its queue, and the CPU can
    no longer launch the next kernels while the GPU works. A copy from pinned memory with
    ``non_blocking=True`` is asynchronous, and PyTorch's caching host allocator keeps the pinned block
    until the copy has completed, so the source may be changed right away. On CPU the array is wrapped
    without a copy, as ``torch.from_numpy(array).to("cpu")`` does.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class _Plan:
    """What the next forward pass writes: set by :class:`IncrementalLM` before each call."""

    def __init__(self) -> None:
        self.prefill_rows: torch.Tensor | None = None  # (n,) rows being (re)filled, or None in decode mode
        self.extend_rows: torch.Tensor | None = None  # (n,) rows taking a chunk of tokens, or None
        self.write_index: torch.Tensor | None = (
            None  # (B,) slot each row writes in decode mode; (n, K) in extend
        )
        self.kv_len: int = 0  # number of slots attention reads in decode and extend mode


class _SlotLayer(CacheLayerMixin):
    """One layer's keys and values, ``(batch, kv_heads, capacity, head_dim)``."""

    is_sliding = False
    is_compileable = False

    def __init__(self, batch_size: int, capacity: int, plan: _Plan) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.capacity = capacity
        self.plan = plan
        self.writes = 0  # calls of update(), so that a layer that bypasses the cache is caught

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
        self.writes += 1
        plan = self.plan
        if plan.prefill_rows is not None:
            # Prefill: the new rows' keys fill slots [0, P); attention reads only these fresh states.
            width = key_states.shape[2]
            self.keys[plan.prefill_rows, :, :width] = key_states
            self.values[plan.prefill_rows, :, :width] = value_states
            return key_states, value_states
        if plan.extend_rows is not None:
            # Extend: K new keys per row at its own slots (pad columns all go to the spare slot); attention
            # reads these rows' whole windows. Indexing (n, 1) rows and (n, K) slots around the head
            # dimension addresses (n, K, heads, dim) elements.
            rows, write = plan.extend_rows[:, None], plan.write_index
            self.keys[rows, :, write] = key_states.transpose(1, 2)
            self.values[rows, :, write] = value_states.transpose(1, 2)
            return self.keys[plan.extend_rows, :, : plan.kv_len], self.values[
                plan.extend_rows, :, : plan.kv_len
            ]
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
        cuda_graph: replay :meth:`decode` as a CUDA graph (CUDA devices only; see below).

    Usage::

        lm = IncrementalLM(model, batch_size=4, capacity=96)
        out = lm.prefill(rows, left_padded_ids, lengths)   # logits for the first new token of these rows
        out = lm.decode(next_tokens)                       # (B,) -> logits for the following token
        out = lm.extend(rows, left_padded_chunks, lengths) # a chunk per row (a tool's reply) in one pass

    ``decode`` runs every row through the same static-shape forward pass, but only the rows in ``advance``
    (all by default) take the token: a row that does not step this turn (finished and about to be
    restarted, frozen, never started) keeps its length and position, and the key it computes lands in its
    own next free slot, which its next real token overwrites before anything reads it. So nothing depends
    on how long a row waits, and no position ever exceeds ``capacity - 1``, which the model's context
    (``n_positions`` / ``max_position_embeddings``) must hold: a longer capacity is rejected. Row lengths
    are tracked on the host as well as on the device, so building the attention window never reads a
    value back from the GPU.

    With ``cuda_graph=True`` a decode step has static shapes (attention reads the whole cache window,
    masked per row, instead of the window of the longest row) and is captured once as a CUDA graph, then
    replayed: an eager decode of a small model launches hundreds of kernels and is bound by the CPU that
    launches them, a replay is one launch (PyTorch's "CUDA Graphs" notes,
    https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). Prefills stay eager; they write into the
    same cache buffers, which the graph reads at every replay. The first two replays are compared with
    the eager static step and any mismatch, like any failure to capture, switches back to eager decoding
    with a warning. Decodes that ask for hidden states or pass ``forward_kwargs`` run eagerly. The
    weights must be updated in place (optimizers do) and not replaced while the graph exists.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        capacity: int,
        *,
        context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        cuda_graph: bool = False,
    ) -> None:
        attn = getattr(unwrap_model(model).config, "_attn_implementation", None) or "sdpa"
        if "flash" in attn:
            raise ValueError(
                f"IncrementalLM needs an attention implementation that accepts 4-D masks ('sdpa' or 'eager'), "
                f"but the model uses {attn!r}; load it with attn_implementation='sdpa'"
            )
        self.layout = attention_layout(model)  # raises UnsupportedArchitectureError
        limit = model_context_length(model)
        if limit is not None and capacity > limit[0]:
            raise ValueError(
                f"sequences of up to {capacity} tokens do not fit the model's context of {limit[0]} "
                f"positions (config.{limit[1]}); shorten the prompts or the responses"
            )
        self.model = model
        self.batch_size = int(batch_size)
        self.capacity = int(capacity) + 1  # one spare slot: a decode past the end writes there, never further
        self.device = model_device(model)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self._context = context or contextlib.nullcontext
        self._cache_kwarg = cache_kwarg(model)
        self._logits_to_keep = accepts_kwarg(model, "logits_to_keep")
        self._head = _cpu_output_head(model, self.device, self.dtype) if self._logits_to_keep else None
        self.cache = SlotCache(_num_layers(model), self.batch_size, self.capacity)
        self.offset = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self.length = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        self._end = np.zeros(self.batch_size, dtype=np.int64)  # host mirror of offset + length
        self._slots = torch.arange(self.capacity, device=self.device)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        self.cuda_graph = bool(cuda_graph)
        self._graph: _DecodeGraph | None = None
        self._graph_checks = 2  # replays compared with the eager step before the graph is trusted

    def _forward(
        self,
        input_ids: torch.Tensor,
        allowed: torch.Tensor,
        distance: torch.Tensor,
        positions: torch.Tensor,
        hidden: bool,
        extra: Mapping[str, Any] | None,
    ) -> Any:
        """One forward pass over the cache; ``allowed`` and ``distance`` (query minus key position) define
        the attention masks of every layer type (see :meth:`llm_env.attention.AttentionLayout.masks`)."""
        additive = self.layout.masks(allowed, distance, self.dtype)
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
        if extra:
            kwargs.update(extra)
        was_training = self.model.training
        if was_training:
            self.model.eval()  # rollouts never use dropout
        try:
            with torch.no_grad(), self._context(), _weight_major_head(self._head):
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
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> DecodeOutput:
        """(Re)start ``rows`` with left-padded prompts.

        Args:
            rows: (n,) row indices to overwrite.
            input_ids: (n, P) token ids, left-padded (each row's tokens end at column P - 1).
            lengths: (n,) host array of the number of real tokens per row.
            hidden: also return the last hidden state at the final position.
            forward_kwargs: extra keyword arguments of this forward pass (e.g. peft's ``adapter_names``).
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        width = input_ids.shape[1]
        if width + 1 > self.capacity:
            raise ValueError(f"prefill of {width} tokens does not fit the cache capacity {self.capacity - 1}")
        rows_t = host_to_device(np.asarray(rows, dtype=np.int64), self.device)
        input_ids = input_ids.to(self.device)
        offsets = host_to_device(width - lengths, self.device)  # (n,) first real column of each row
        cols = torch.arange(width, device=self.device)
        # (n, 1, P, P): a query attends to real keys at or before itself.
        mask = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] >= offsets[:, None, None])
        distance = cols[:, None] - cols[None, :]  # (P, P): query column minus key column
        positions = (cols[None, :] - offsets[:, None]).clamp_(min=0)
        self.cache.plan.prefill_rows = rows_t
        before = [layer.writes for layer in self.cache.layers]
        try:
            out = self._forward(input_ids, mask[:, None], distance, positions, hidden, forward_kwargs)
        finally:
            self.cache.plan.prefill_rows = None
        self._check_every_layer_cached(before)
        self.offset[rows_t] = offsets
        self.length[rows_t] = host_to_device(lengths, self.device)
        self._end[np.asarray(rows)] = width
        return DecodeOutput(
            logits=out.logits[:, -1].float(),
            hidden=out.hidden_states[-1][:, -1] if hidden else None,
        )

    def extend(
        self,
        rows: torch.Tensor | np.ndarray,
        input_ids: torch.Tensor,
        lengths: np.ndarray,
        *,
        hidden: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> DecodeOutput:
        """Append a chunk of tokens to each of ``rows`` (which hold sequences) in one forward pass.

        What a multi-turn environment needs when a tool, a user or a game answers: the reply's tokens
        join the row's context after its own tokens, attending to everything before them, without
        re-encoding the context. Each chunk token ``j`` of row ``i`` gets position ``length_i + j`` and
        slot ``offset_i + length_i + j``, exactly where :meth:`decode` would have put it one at a time, so
        the logits equal a full forward pass over the longer sequence.

        Args:
            rows: (n,) host row indices, each holding a sequence (prefilled before).
            input_ids: (n, K) token ids, left-padded (each row's chunk ends at column K - 1).
            lengths: (n,) host array, the number of real tokens per row (>= 1).
            hidden: also return the last hidden state at the final position.
            forward_kwargs: extra keyword arguments of this forward pass (e.g. peft's ``adapter_names``).

        Returns the logits of the token after each row's chunk, (n, V).
        """
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        n, width = input_ids.shape
        if len(rows) != n or lengths.shape != (n,) or (lengths < 1).any() or (lengths > width).any():
            raise ValueError(
                f"extend needs one row index and one length in [1, {width}] per chunk, got rows {rows.tolist()} "
                f"and lengths {lengths.tolist()} for {n} chunks"
            )
        rows_t = host_to_device(rows, self.device)
        # The rows' exact ends (the host mirror is only an upper bound after decodes whose ``advance`` was a
        # device tensor): one read of n numbers, on a step that is rare (a reply joining a conversation).
        ends = (self.offset[rows_t] + self.length[rows_t]).cpu().numpy() + lengths
        if (ends > self.capacity - 1).any():
            raise ValueError(
                f"extending rows {rows[ends > self.capacity - 1].tolist()} by {lengths.tolist()} tokens "
                f"overflows the cache capacity {self.capacity - 1}"
            )
        input_ids = input_ids.to(self.device)
        pads = host_to_device(width - lengths, self.device)[:, None]  # (n, 1)
        cols = torch.arange(width, device=self.device)[None, :]
        real = cols >= pads  # (n, K)
        length = self.length[rows_t][:, None]
        write = torch.where(real, self.offset[rows_t][:, None] + length + cols - pads, self.capacity - 1)
        positions = torch.where(real, length + cols - pads, 0)
        kv_len = int(ends.max())
        slots = self._slots[:kv_len]
        offset = self.offset[rows_t][:, None, None]
        # (n, K, kv_len): a real query attends to its row's keys at or before itself.
        allowed = (slots >= offset) & (slots <= write[:, :, None]) & real[:, :, None]
        distance = write[:, :, None] - slots
        plan = self.cache.plan
        plan.extend_rows, plan.write_index, plan.kv_len = rows_t, write, kv_len
        before = [layer.writes for layer in self.cache.layers]
        try:
            out = self._forward(
                input_ids, allowed[:, None], distance[:, None], positions, hidden, forward_kwargs
            )
        finally:
            plan.extend_rows = None
        self._check_every_layer_cached(before)
        self.length[rows_t] += host_to_device(lengths, self.device)
        self._end[rows] = ends
        return DecodeOutput(
            logits=out.logits[:, -1].float(),
            hidden=out.hidden_states[-1][:, -1] if hidden else None,
        )

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        advance: np.ndarray | torch.Tensor | None = None,
        hidden: bool = False,
        forward_kwargs: Mapping[str, Any] | None = None,
    ) -> DecodeOutput:
        """Append one token to the rows in ``advance`` and return the logits for the next one.

        Args:
            tokens: (B,) token ids on any device.
            advance: (B,) bool, the rows that take their token (default: all). A row outside it keeps its
                state (see the class docstring) and its logits and hidden state are meaningless. A host
                array also keeps the attention window exact; a device tensor costs no host read, but the
                window is then sized as if every row advanced (masked, so only the cost differs).
            hidden: also return the last hidden state, (B, d).
            forward_kwargs: extra keyword arguments of this forward pass (e.g. peft's ``adapter_names``).
        """
        tokens = tokens.to(self.device).view(self.batch_size, 1)
        if advance is None:
            step, grown = 1, np.ones(self.batch_size, dtype=bool)
        elif isinstance(advance, torch.Tensor):
            step, grown = advance.to(self.device, torch.long), np.ones(self.batch_size, dtype=bool)
        else:
            grown = np.asarray(advance, dtype=bool)
            step = host_to_device(grown, self.device)
        if self.cuda_graph and not hidden and not forward_kwargs:
            logits = self._graph_step(tokens)
            if logits is not None:
                self._advance(step, grown)
                return DecodeOutput(logits=logits)
        write, positions = self._next_slots()
        kv_len = int(min(self._end.max() + 1, self.capacity))
        slots = self._slots[:kv_len]
        mask = (slots[None, :] >= self.offset[:, None]) & (slots[None, :] <= write[:, None])  # (B, kv_len)
        distance = write[:, None] - slots[None, :]  # (B, kv_len): the new token's position minus each key's
        plan = self.cache.plan
        plan.write_index, plan.kv_len = write, kv_len
        out = self._forward(
            tokens, mask[:, None, None, :], distance[:, None, None, :], positions, hidden, forward_kwargs
        )
        self._advance(step, grown)
        return DecodeOutput(
            logits=out.logits[:, -1].float(),
            hidden=out.hidden_states[-1][:, -1] if hidden else None,
        )

    def _check_every_layer_cached(self, before: list[int]) -> None:
        """Every layer must have written its keys and values exactly once in the forward pass just run: a
        layer that keeps a state of its own (a recurrent or linear-attention layer) or reads another's
        cache would otherwise decode from stale or missing keys."""
        missed = [i for i, (layer, n) in enumerate(zip(self.cache.layers, before)) if layer.writes != n + 1]
        if missed:
            raise UnsupportedArchitectureError(
                f"{type(unwrap_model(self.model)).__name__}: layers {missed} of {len(self.cache.layers)} did "
                "not write exactly one key/value block to the KV cache in a forward pass (layers with a "
                "state of their own, or that share another layer's cache); the slot KV cache cannot decode "
                "this model exactly"
            )

    def _next_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the slot each row's next key goes to and (B, 1) the position of its next token.

        Both stay inside the cache and the model's context even for a row that is full (its episode has
        ended and it does not advance): the slot is the spare one, the position the last real one.
        """
        write = (self.offset + self.length).clamp(max=self.capacity - 1)
        positions = self.length.clamp(max=self.capacity - 2)[:, None]
        return write, positions

    def _advance(self, step: torch.Tensor | int, grown: np.ndarray) -> None:
        """Move the rows that took their token one slot on (device lengths and their host bound)."""
        self.length += step
        self._end[grown] = np.minimum(self._end[grown] + 1, self.capacity - 1)

    def _full_window_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode with static shapes, without advancing the lengths: (B, 1) tokens -> (B, V) logits.

        Attention reads all ``capacity`` slots, masked to each row's own ``[offset, offset + length]``,
        so nothing depends on host values and the step can be captured. It writes the tokens' keys and
        values at each row's next slot; running it twice writes the same slot twice.
        """
        write, positions = self._next_slots()
        mask = (self._slots[None, :] >= self.offset[:, None]) & (self._slots[None, :] <= write[:, None])
        distance = write[:, None] - self._slots[None, :]
        plan = self.cache.plan
        plan.write_index, plan.kv_len = write, self.capacity
        out = self._forward(
            tokens, mask[:, None, None, :], distance[:, None, None, :], positions, False, None
        )
        return out.logits[:, -1].float()

    def _graph_step(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The logits of a replayed decode (a buffer the next replay overwrites), or None to decode eagerly."""
        try:
            if self._graph is None:
                self._graph = _DecodeGraph(self)
            logits = self._graph.replay(tokens)
            if self._graph_checks > 0:  # trust, but verify: the eager step rewrites the same cache slots
                self._graph_checks -= 1
                expected = self._full_window_step(tokens)
                if not torch.allclose(logits, expected, rtol=1e-2, atol=1e-2):
                    raise RuntimeError("the replayed CUDA graph disagrees with the eager decode")
        except Exception as exc:  # capture is not possible for every model: fall back, loudly
            warnings.warn(
                f"CUDA graph decoding disabled, decoding eagerly: {exc}", RuntimeWarning, stacklevel=3
            )
            self.cuda_graph, self._graph = False, None
            return None
        return logits


class _DecodeGraph:
    """A CUDA graph of :meth:`IncrementalLM._full_window_step` with its static input and output buffers."""

    def __init__(self, lm: IncrementalLM) -> None:
        self.tokens = torch.zeros(lm.batch_size, 1, dtype=torch.long, device=lm.device)
        # Warm up on a side stream before capturing (lazy initialisations, cuBLAS workspaces), as the
        # PyTorch CUDA Graphs notes prescribe; the warm-up only rewrites the next cache slot of each row.
        current = torch.cuda.current_stream(lm.device)
        side = torch.cuda.Stream(lm.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                lm._full_window_step(self.tokens)
        current.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = lm._full_window_step(self.tokens)

    def replay(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens.view_as(self.tokens))
        self.graph.replay()
        return self.logits


def _weight_major_linear(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` computed as ``(W @ x^T)^T``: the same product, with the weight as the left operand."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(head.weight, rows.T).T.contiguous()  # (n, V)
    if head.bias is not None:
        out += head.bias
    return out.view(*x.shape[:-1], out.shape[-1])


def _cpu_output_head(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Linear | None:
    """The LM head that :func:`_weight_major_linear` may stand in for during a decode, or None.

    Why: a decode step multiplies a few rows by the (V, d) head, and on CPU MKL's ``x @ W^T`` for such
    skinny ``x`` runs well below memory bandwidth: on 2 cores, V = 50257, d = 384, ``W @ x^T`` plus the
    transpose copy takes 7.8 ms instead of 9.3 ms at 16 rows and 2.5 ms instead of 8 ms at 4 rows (measured
    interleaved). Only a plain float32 ``nn.Linear`` on CPU qualifies, so a head with LoRA, another dtype or
    a custom forward is left alone, and the model's own code still applies whatever follows the head.
    """
    if device.type != "cpu" or dtype != torch.float32 or not hasattr(model, "get_output_embeddings"):
        return None
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if type(head) is not nn.Linear or "forward" in vars(head):
        return None
    return head


@contextlib.contextmanager
def _weight_major_head(head: nn.Linear | None) -> Any:
    """Let ``head`` compute as :func:`_weight_major_linear` inside the block (an instance attribute shadows
    the class's ``forward`` and is deleted afterwards, restoring it exactly)."""
    if head is None:
        yield
        return
    head.forward = partial(_weight_major_linear, head)
    try:
        yield
    finally:
        del head.forward


def left_pad(
    sequences: list[np.ndarray], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, np.ndarray]:
    """Stack token arrays into a left-padded ``(n, max_len)`` tensor; also return the lengths."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    width = int(lengths.max())
    out = np.full((len(sequences), width), pad_id, dtype=np.int64)
    for i, seq in enumerate(sequences):
        out[i, width - len(seq) :] = seq
    return host_to_device(out, torch.device(device)), lengths
