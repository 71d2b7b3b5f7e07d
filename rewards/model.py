"""The reward model: a transformers backbone with a scalar head, plus its score statistics.

A :class:`RewardModel` wraps a one-label ``...ForSequenceClassification`` model (GPT-2, Llama, Mistral,
Qwen, ...: a decoder backbone whose ``score`` head is a linear map from the last hidden state to one
number). Llama 2 initialises its reward models "from pretrained chat model checkpoints ... the classification
head for next-token prediction is replaced with a regression head outputting a scalar reward" (Touvron
et al. 2023, section 3.2.2): :meth:`RewardModel.from_causal_lm` does exactly that.

Serving (scoring texts, score statistics, whitening, loading a saved directory) is
:class:`llm_env.reward.SequenceClassifierReward`, which the environment uses without importing this
package; :class:`RewardModel` adds what training needs: construction from a causal LM, LoRA, differentiable
scores of padded batches, calibration and saving.

The score of ``prompt + response`` is read at its last real token (:func:`llm_env.reward.sequence_scores`),
whatever the padding. ``save_pretrained`` writes the model as a plain sequence-classification checkpoint
(safetensors, LoRA merged) with its tokenizer and a ``reward_model.json`` holding the score statistics on
the training data, so scores can be whitened at serving time and any transformers user can still load the
directory with ``AutoModelForSequenceClassification``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from llm_env.models import (
    load_sequence_classifier,
    load_tokenizer,
    pad_token_id,
    resolve_device,
    resolve_dtype,
    unwrap_model,
)
from llm_env.reward import (
    FORMAT_VERSION,
    METADATA_FILE,
    ScoreStats,
    SequenceClassifierReward,
    check_scores,
    read_reward_metadata,
    sequence_scores,
)

__all__ = ["FORMAT_VERSION", "RewardModel", "ScoreStats", "load_reward_model", "right_align"]


def right_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the front, so left-padded batches become right-padded.

    :func:`llm_env.reward.sequence_scores` reads each row at ``sum(mask) - 1`` and lets the model number
    positions from 0, which is right only for right padding; a stable sort of the positions by "is pad"
    fixes any layout in one gather (right-padded rows are unchanged).
    """
    order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)  # (n, T)
    return input_ids.gather(1, order), attention_mask.gather(1, order)


class RewardModel(SequenceClassifierReward):
    """A text scorer ``r(prompt, response)`` backed by a one-label sequence-classification model.

    Calling it on texts returns a float32 tensor of shape ``(n,)`` on the model's device, so it can be
    passed directly as the environment's ``reward=`` (it is a :class:`~llm_env.reward.SequenceClassifierReward`).

    Args:
        model: a ``...ForSequenceClassification`` model with ``num_labels == 1`` (or a peft model around one).
        tokenizer: its tokenizer.
        stats: score statistics on the training data (set by the trainer or :meth:`calibrate`).
        batch_size: texts per forward pass when scoring.
        max_length: texts longer than this many tokens keep their last ``max_length`` tokens; ``None`` uses
            the model's position limit.
        whiten: whether calling the model returns whitened scores (``score(..., whiten=...)`` overrides).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        stats: ScoreStats | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        whiten: bool = False,
    ) -> None:
        config = getattr(unwrap_model(model), "config", None)
        if config is None or getattr(config, "num_labels", None) != 1:
            labels = getattr(config, "num_labels", None)
            raise ValueError(
                "a reward model needs a sequence-classification model with num_labels=1, "
                f"got num_labels={labels}; "
                "load it with AutoModelForSequenceClassification.from_pretrained(path, num_labels=1) or use "
                "RewardModel.from_causal_lm(path)"
            )
        super().__init__(
            model, tokenizer, batch_size=batch_size, max_length=max_length, stats=stats, whiten=whiten
        )

    # ------------------------------------------------------------------------------------- construction
    @classmethod
    def from_causal_lm(
        cls,
        model: PreTrainedModel | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> RewardModel:
        """A reward model initialised from a causal LM with its LM head replaced by a scalar head (Llama 2).

        A path or hub name is loaded straight into ``AutoModelForSequenceClassification`` with one label
        (transformers keeps the backbone and initialises the ``score`` head). An in-memory causal LM has its
        backbone weights copied into a freshly built sequence-classification model of the same config; the
        head is initialised from torch's global generator, so seed it for reproducibility.
        ``kwargs`` go to the constructor (``batch_size``, ``max_length``, ...).
        """
        if isinstance(model, (str, os.PathLike)):
            tok = load_tokenizer(
                tokenizer if tokenizer is not None else model, trust_remote_code=trust_remote_code
            )
            seq = load_sequence_classifier(
                model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, num_labels=1
            )
        else:
            if tokenizer is None:
                raise ValueError("a causal LM object needs its tokenizer: pass tokenizer=...")
            tok = load_tokenizer(tokenizer)
            seq = _classifier_from_causal_lm(model)
            seq = _move(seq, device, dtype)
        _set_pad_token(seq, tok)
        return cls(seq, tok, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> RewardModel:
        """Load a directory written by :meth:`save_pretrained` (model, tokenizer and ``reward_model.json``).

        ``kwargs`` (``batch_size``, ``max_length``, ``whiten``) override the saved values.
        """
        options = read_reward_metadata(path)
        if options is None:
            raise FileNotFoundError(
                f"{os.fspath(path)} has no {METADATA_FILE}: not a directory saved by RewardModel.save_pretrained "
                "(a plain sequence-classification checkpoint loads with load_reward_model(path))"
            )
        options.update(kwargs)
        model = load_sequence_classifier(
            path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **options)

    # ---------------------------------------------------------------------------------------- properties
    @property
    def is_lora(self) -> bool:
        """Whether the backbone carries LoRA adapters (a peft model, merged into the weights when saved)."""
        return hasattr(self.model, "merge_and_unload")

    def parameters(self) -> Iterator[nn.Parameter]:
        """The model's parameters (those with ``requires_grad`` are the trainable ones)."""
        return self.model.parameters()

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None
    ) -> RewardModel:
        """Move the model (in place) and return ``self``."""
        self.model = _move(self.model, device, dtype)
        return self

    def train(self, mode: bool = True) -> RewardModel:
        """Put the model in training mode (``mode=False``: evaluation mode) and return ``self``, like
        :meth:`torch.nn.Module.train`."""
        self.model.train(mode)
        return self

    def eval(self) -> RewardModel:
        """Put the model in evaluation mode (dropout off) and return ``self``."""
        return self.train(False)

    # -------------------------------------------------------------------------------------------- LoRA
    def add_lora(
        self,
        rank: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: Sequence[str] | None = None,
    ) -> RewardModel:
        """Wrap the model with a peft LoRA adapter (Hu et al. 2021); the scalar head stays fully trainable.

        ``alpha`` defaults to ``2 * rank``; ``target_modules`` defaults to peft's choice for the
        architecture (attention projections). Returns ``self``.
        """
        from peft import LoraConfig, TaskType, get_peft_model

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if self.is_lora:
            raise ValueError("the model already has a LoRA adapter; call merge_lora() first")
        base = self.model
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,  # also keeps the new `score` head trainable (modules_to_save)
            r=rank,
            lora_alpha=alpha if alpha is not None else 2 * rank,
            lora_dropout=dropout,
            target_modules=list(target_modules) if target_modules is not None else None,
            # GPT-2 stores its projections transposed (Conv1D); tell peft instead of letting it warn.
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in base.modules()),
        )
        self.model = get_peft_model(base, config)
        return self

    def merge_lora(self) -> RewardModel:
        """Merge a LoRA adapter into the weights (no-op without one). Returns ``self``."""
        if self.is_lora:
            self.model = self.model.merge_and_unload()
        return self

    # ------------------------------------------------------------------------------------------ scoring
    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Differentiable scores of a padded batch (left or right padding), shape ``(n,)`` float32."""
        input_ids, attention_mask = right_align(input_ids, attention_mask)
        return sequence_scores(self.model, input_ids, attention_mask)

    def calibrate(self, prompts: Sequence[str], responses: Sequence[str]) -> ScoreStats:
        """Measure and store the score statistics on a reference set of texts (e.g. the training data)."""
        scores = check_scores(self.score(prompts, responses), len(prompts), "the reward model")
        self.stats = ScoreStats.of(scores)
        return self.stats

    # --------------------------------------------------------------------------------------------- saving
    def save_pretrained(
        self, directory: str | os.PathLike, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Write the model (safetensors, LoRA merged), its tokenizer and ``reward_model.json``.

        The directory loads back with :meth:`from_pretrained`, as the environment's ``reward=`` path, and as
        a plain ``AutoModelForSequenceClassification``. ``metadata`` (JSON-serialisable) is stored too, e.g.
        the training configuration and metrics. A model with a LoRA adapter is merged in a copy, so the
        adapter stays trainable here.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        model = copy.deepcopy(self.model).merge_and_unload() if self.is_lora else self.model
        _set_pad_token(model, self.tokenizer)
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        meta = {
            "format_version": FORMAT_VERSION,
            "stats": None if self.stats is None else vars(self.stats),
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "whiten": self.whiten,
            "metadata": metadata or {},
        }
        # Written last: a directory with reward_model.json is a complete one.
        with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)

    def __repr__(self) -> str:
        name = type(unwrap_model(self.model)).__name__
        return (
            f"RewardModel({name}{', LoRA' if self.is_lora else ''}, stats={self.stats}, device={self.device})"
        )


def _move(model: nn.Module, device: torch.device | str | None, dtype: torch.dtype | str | None) -> Any:
    """``model.to(device, dtype)`` for the arguments that are given (``"auto"`` picks CUDA when available)."""
    if device is None and dtype is None:
        return model
    return model.to(device=None if device is None else resolve_device(device), dtype=resolve_dtype(dtype))


def _set_pad_token(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the config a pad token id, so transformers' own pooling works on the saved checkpoint too."""
    config = unwrap_model(model).config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_token_id(tokenizer)


def _classifier_from_causal_lm(causal: nn.Module) -> PreTrainedModel:
    """A one-label sequence classifier whose backbone is a copy of ``causal``'s backbone."""
    if hasattr(causal, "merge_and_unload"):
        raise ValueError("merge the causal LM's adapter first (model.merge_and_unload()), then convert it")
    if not isinstance(causal, PreTrainedModel):
        raise TypeError(f"expected a transformers causal LM or a path, got {type(causal).__name__}")
    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    try:
        seq = AutoModelForSequenceClassification.from_config(config)
    except ValueError as exc:
        raise ValueError(
            f"transformers has no sequence-classification class for model type {config.model_type!r}: {exc}"
        ) from None
    param = next(causal.parameters())
    seq = seq.to(device=param.device, dtype=param.dtype)
    seq.base_model.load_state_dict(causal.base_model.state_dict())  # strict: every backbone weight copied
    return seq.train(causal.training)


def load_reward_model(
    model: RewardModel | PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> RewardModel:
    """A :class:`RewardModel` from whatever the user has.

    * a :class:`RewardModel`: returned as is;
    * a directory with ``reward_model.json``: :meth:`RewardModel.from_pretrained`;
    * a sequence-classification model or checkpoint (its ``config.json`` names a
      ``...ForSequenceClassification`` architecture): wrapped as it is;
    * any other causal LM object or checkpoint: :meth:`RewardModel.from_causal_lm` (new scalar head).
    """
    if isinstance(model, RewardModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isfile(os.path.join(path, METADATA_FILE)):
            return RewardModel.from_pretrained(
                path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
            )
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if _is_classifier(getattr(config, "architectures", None) or []):
            seq = load_sequence_classifier(
                path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
            )
            tok = load_tokenizer(
                tokenizer if tokenizer is not None else path, trust_remote_code=trust_remote_code
            )
            _set_pad_token(seq, tok)
            return RewardModel(seq, tok, **kwargs)
        return RewardModel.from_causal_lm(
            path, tokenizer, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a RewardModel, a transformers model or a path, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("a model object needs its tokenizer: pass tokenizer=...")
    inner = unwrap_model(model)
    if _is_classifier([type(inner).__name__]):
        tok = load_tokenizer(tokenizer)
        model = _move(model, device, dtype)
        _set_pad_token(model, tok)
        return RewardModel(model, tok, **kwargs)
    return RewardModel.from_causal_lm(model, tokenizer, device=device, dtype=dtype, **kwargs)


def _is_classifier(architectures: Sequence[str]) -> bool:
    return any(name.endswith("ForSequenceClassification") for name in architectures)
