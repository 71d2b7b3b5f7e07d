"""A LoRA policy and its adapter-disabled reference decoded as the two halves of one slot KV cache.

With LoRA the reference is the policy's own base weights, so one forward pass over the base weights can
serve both the agent's decode and the environment's reference decode (see :class:`FusedDecoder`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from llm_env.decoding import DecodeOutput, IncrementalLM, host_to_device

__all__ = ["FusedDecoder"]


def _plain_lora_layers(model: nn.Module, adapter: str) -> list[nn.Module] | None:
    """The layers carrying ``adapter`` when every one is an unmerged vanilla LoRA ``Linear`` (output
    ``base(x) + lora_B(lora_A(x)) * scaling``), else None."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    layers = []
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", ("lora_A", "lora_B", "lora_embedding_A"))
        if not isinstance(module, LoraLayer) or not any(adapter in getattr(module, n, {}) for n in names):
            continue  # not a LoRA layer, or one without this adapter
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter):
            raise ValueError(
                "AdapterDisabled(fuse=True) supports plain LoRA adapters, not DoRA or other LoRA variants; "
                "use fuse=False"
            )
        if type(module).__name__ == "ParamWrapper":  # LoRA on a parameter, e.g. fused MoE experts
            raise ValueError(
                f"AdapterDisabled(fuse=True): the LoRA adapter on the parameter {module.parameter_name!r} of "
                f"{type(module.get_base_layer()).__name__} (peft's target_parameters, e.g. a mixture of "
                "experts' weights) cannot be switched off for half of a batch; use fuse=False (in the agents' "
                "configs: fuse_reference=False), or put LoRA on linear layers only"
            )
        if type(module) is not LoraLinear or module.merged:
            return None
        layers.append(module)
    return layers or None


def _row_mask(n: int, device: torch.device) -> torch.Tensor:
    """(2n, 1, 1): 1 on the n policy rows, 0 on the n reference rows that follow them."""
    mask = torch.zeros(2 * n, 1, 1, device=device)
    mask[:n] = 1.0
    return mask


class _RowMaskedLora:
    """Forward hooks, present only inside :meth:`active`, that zero the LoRA term of masked-out rows."""

    def __init__(self, layers: list[nn.Module], adapter: str) -> None:
        self.layers = layers
        self.outputs = [layer.lora_B[adapter] for layer in layers]
        self.row_mask: torch.Tensor | None = None

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        mask = self.row_mask  # (2n, 1, 1)
        if output.dim() == 2:  # rows flattened with their positions, (2n * T, out): OPT's MLP
            mask = mask.view(-1, 1).repeat_interleave(output.shape[0] // mask.shape[0], dim=0)
        return output * mask.to(output.dtype)  # (2n, T, out) * (2n, 1, 1)

    @contextlib.contextmanager
    def active(self) -> Any:
        if any(layer.merged for layer in self.layers):
            raise RuntimeError(
                "the LoRA adapter is merged into the base weights, which are then no longer the reference"
            )
        handles = [module.register_forward_hook(self._hook) for module in self.outputs]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class FusedDecoder:
    """A LoRA policy and its adapter-disabled reference decoded in one forward pass over 2B rows.

    Why: on a memory-bound decode step, reading the weights costs more than the arithmetic (on 2 CPU cores
    a GPT-2 step over 32 rows costs ~1.4x one over 16 rows, and the 50257 x 384 LM head alone is half of
    it). With LoRA the reference is the policy's own base weights, so rows ``[0, B)`` run with the adapter
    and rows ``[B, 2B)`` without it: one pass over the base weights serves both models, instead of one for
    the agent's policy decode and one for the environment's reference decode.

    How the reference rows lose the adapter: for vanilla LoRA on linear layers (what
    :func:`agents.add_lora` builds), a forward hook multiplies each ``lora_B`` output by a per-row 0/1
    mask, so the reference rows compute ``base(x) + 0``, exactly the base; no Python list reaches the
    forward, so there is no host-to-device copy per layer on a GPU. Other LoRA layers (on embeddings,
    convolutions, quantized linears) use peft's mixed-batch ``adapter_names`` forward with its special
    name ``"__base__"`` instead, which builds index tensors per layer and call. DoRA and other LoRA
    variants are refused (peft has no mixed-batch forward for them).

    The environment owns it (``reference=AdapterDisabled(peft_model, fuse=True)``) and reads the reference
    half itself, so the reference log-probabilities are never taken from the agent. The policy half is kept
    as :attr:`policy_logits`, the policy's next-token logits of the current states, together with the
    observation tensor they belong to (:meth:`mark_observation`, called by the environment when it builds
    an observation). An agent reads them through the public call
    :meth:`llm_env.TextGenVectorEnv.policy_logits` of the environment it was given, with the observation it
    was handed, and samples from them instead of running its own decode; for any other observation (a copy,
    a stale one) that call returns None and the agent decodes itself.

    Both halves always hold the same tokens (the environment's states), prefilled and advanced together, so
    the per-row slot cache and its restart semantics are those of :class:`IncrementalLM` over 2B rows.
    The policy half is computed with the adapter weights of the time of the forward pass, exactly as an
    agent's own cache would be.
    """

    def __init__(self, model: nn.Module, batch_size: int, capacity: int, *, cuda_graph: bool = False) -> None:
        adapter = getattr(model, "active_adapter", None)
        if not isinstance(adapter, str):
            raise ValueError(
                f"a fused reference needs a peft model with one active adapter, got active_adapter={adapter!r}"
            )
        self.model = model
        self.adapter = adapter
        self.batch_size = int(batch_size)
        layers = _plain_lora_layers(model, adapter)
        self._masking = _RowMaskedLora(layers, adapter) if layers is not None else None
        context = self._masking.active if self._masking is not None else None
        self.lm = IncrementalLM(model, 2 * self.batch_size, capacity, context=context, cuda_graph=cuda_graph)
        self.device = self.lm.device
        self._decode_mask = _row_mask(self.batch_size, self.device)
        self.policy_logits: torch.Tensor | None = None  # (B, V) float32, next-token logits of the policy
        self.observation: torch.Tensor | None = None  # the observation the policy logits belong to

    def _forward_kwargs(self, n: int) -> dict[str, Any]:
        """Per-call arguments for n policy rows followed by n reference rows."""
        if self._masking is not None:
            self._masking.row_mask = self._decode_mask if n == self.batch_size else _row_mask(n, self.device)
            return {}
        return {"adapter_names": [self.adapter] * n + ["__base__"] * n}

    def prefill(
        self, rows: torch.Tensor | np.ndarray, input_ids: torch.Tensor, lengths: np.ndarray
    ) -> DecodeOutput:
        """(Re)start ``rows`` in both halves; returns the reference's logits for these rows, (n, V)."""
        return self._both(self.lm.prefill, rows, input_ids, lengths)

    def extend(self, rows: np.ndarray, input_ids: torch.Tensor, lengths: np.ndarray) -> DecodeOutput:
        """Append left-padded chunks to ``rows`` in both halves (see :meth:`IncrementalLM.extend`); returns
        the reference's logits for these rows, (n, V)."""
        return self._both(self.lm.extend, rows, input_ids, lengths)

    def _both(
        self, method: Any, rows: torch.Tensor | np.ndarray, input_ids: torch.Tensor, lengths: np.ndarray
    ) -> DecodeOutput:
        """Run a prefill or an extend of ``self.lm`` on ``rows`` of the policy half and the same rows of the
        reference half in one pass; keep the policy's logits, return the reference's."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        input_ids = input_ids.to(self.device)
        lengths = np.asarray(lengths, dtype=np.int64)
        out = method(
            np.concatenate([rows, rows + self.batch_size]),
            torch.cat([input_ids, input_ids]),
            np.concatenate([lengths, lengths]),
            forward_kwargs=self._forward_kwargs(n),
        )
        if self.policy_logits is None:
            self.policy_logits = out.logits.new_zeros(self.batch_size, out.logits.shape[-1])
        self.policy_logits[host_to_device(rows, self.device)] = out.logits[:n]
        self.observation = None
        return DecodeOutput(logits=out.logits[n:])

    def decode(self, tokens: torch.Tensor, *, advance: np.ndarray | None = None) -> DecodeOutput:
        """Append ``tokens`` (B,) to both halves, in the rows ``advance`` (host bool, default all; see
        :meth:`IncrementalLM.decode`); returns the reference's next-token logits, (B, V)."""
        tokens = tokens.to(self.device)
        both = None if advance is None else np.concatenate([advance, advance])
        out = self.lm.decode(
            torch.cat([tokens, tokens]), advance=both, forward_kwargs=self._forward_kwargs(self.batch_size)
        )
        self.policy_logits = out.logits[: self.batch_size]
        self.observation = None
        return DecodeOutput(logits=out.logits[self.batch_size :])

    def mark_observation(self, input_ids: torch.Tensor) -> None:
        """Declare ``input_ids`` (the tensor handed to the agent) to be the state of :attr:`policy_logits`."""
        self.observation = input_ids

    def logits_for(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """:attr:`policy_logits` if ``input_ids`` is the very observation tensor they belong to, else None."""
        if self.policy_logits is not None and self.observation is input_ids:
            return self.policy_logits
        return None
