"""Reward sources: anything that scores a batch of (prompt, response) texts.

The environment accepts

* a batched callable ``(prompts: list[str], responses: list[str]) -> scores`` (list, array or tensor of
  shape ``(n,)``),
* a transformers sequence-classification model (object, or a path / hub name), scored at the last
  non-pad token of ``prompt + response``,
* a directory saved by :class:`rewards.RewardModel` (it is such a model plus ``reward_model.json``, the
  score statistics used to whiten its scores).

All of them become a :class:`RewardFunction` that returns a float32 tensor of shape ``(n,)`` and checks
what the source returned: a wrong shape, NaN or inf raises an error that names the offending rows.

This module is the serving half of reward models: it reads what ``rewards`` writes (the checkpoint and
``reward_model.json``) but never imports ``rewards``, which adds training, LoRA and saving on top of
:class:`SequenceClassifierReward`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_env.chat import ChatPrompt, conversation_text
from llm_env.models import (
    load_sequence_classifier,
    load_tokenizer,
    model_context_length,
    model_device,
    model_vocab_size,
    pad_token_id,
    unwrap_model,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "RewardFunction",
    "ScoreStats",
    "SequenceClassifierReward",
    "as_reward_function",
    "check_scores",
    "read_reward_metadata",
]

FORMAT_VERSION = 1
"""Version of ``reward_model.json``; bumped when its meaning changes."""

METADATA_FILE = "reward_model.json"
"""The file that marks a directory saved by ``rewards.RewardModel.save_pretrained``."""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores ``n`` (prompt, response) pairs; returns a float tensor of shape ``(n,)``."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Any: ...


def check_scores(scores: Any, n: int, source: str = "reward source") -> torch.Tensor:
    """Convert ``scores`` to a float32 CPU-or-device tensor of shape ``(n,)`` or raise naming the problem."""
    if isinstance(scores, torch.Tensor):
        tensor = scores.detach()
    else:
        try:
            tensor = torch.as_tensor(np.asarray(scores, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{source} must return numbers, got {type(scores).__name__}: {exc}") from None
    if tensor.shape != (n,):
        raise ValueError(f"{source} returned shape {tuple(tensor.shape)} for {n} responses; expected ({n},)")
    tensor = tensor.float()
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(
            f"{source} returned non-finite scores (NaN or inf) for responses {bad}: {tensor[bad].tolist()}"
        )
    return tensor


@dataclass(frozen=True)
class ScoreStats:
    """Mean and standard deviation of a reward model's scores on a reference set (its training data).

    Whitening ``(score - mean) / std`` puts rewards from different models and training runs on one
    scale, which PPO's value function and KL coefficient are sensitive to (Llama 2 whitens its combined
    reward; Ziegler et al. 2019 normalise the reward model to mean 0, std 1 on the initial policy).
    """

    mean: float
    std: float
    count: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(f"score statistics need a finite mean and a positive std, got {self}")

    @classmethod
    def of(cls, scores: torch.Tensor) -> ScoreStats:
        """Statistics of a tensor of scores (population std, floored at 1e-6 so it can divide)."""
        scores = scores.detach().double().flatten()
        if scores.numel() == 0:
            raise ValueError("cannot compute score statistics of zero scores")
        std = float(scores.std(correction=0)) if scores.numel() > 1 else 1.0
        return cls(mean=float(scores.mean()), std=max(std, 1e-6), count=int(scores.numel()))

    def whiten(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / std``: the scores on the scale of mean 0 and std 1 over the reference set."""
        return (scores - self.mean) / self.std


def read_reward_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The serving options saved in ``<path>/reward_model.json`` (``stats``, ``batch_size``, ``max_length``,
    ``whiten``), or None when the directory has no such file (a plain sequence-classification checkpoint)."""
    meta_path = os.path.join(os.fspath(path), METADATA_FILE)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format_version {version!r} is not supported (this library reads {FORMAT_VERSION})"
        )
    stats = meta.get("stats")
    return {
        "stats": ScoreStats(**stats) if stats else None,
        "batch_size": meta.get("batch_size", 32),
        "max_length": meta.get("max_length"),
        "whiten": meta.get("whiten", False),
    }


class SequenceClassifierReward:
    """Score texts with a transformers sequence-classification model (one label).

    The score is read at the last non-pad token of each ``prompt + response``, computed from the attention
    mask of right-padded batches, so neither the model config's ``pad_token_id`` nor a pad token that
    equals EOS can move it. Decoder models (``...ForSequenceClassification`` with a ``score`` head: GPT-2,
    Llama, Mistral, Qwen, ...) are run as backbone + head on the exact last position; other models are
    called directly and must pool correctly themselves.

    Args:
        model: the sequence-classification model.
        tokenizer: its tokenizer.
        batch_size: texts per forward pass.
        max_length: texts longer than this many tokens keep their last ``max_length`` tokens (the
            response end, where the score is read); ``None`` uses the model's position limit if it has one.
        stats: score statistics on the model's training data (what :meth:`whiten_scores` uses).
        whiten: whether calling the scorer returns whitened scores (``score(..., whiten=...)`` overrides).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        stats: ScoreStats | None = None,
        whiten: bool = False,
    ) -> None:
        vocab = model_vocab_size_safe(model)
        if vocab is not None and len(tokenizer) > vocab:
            raise ValueError(
                f"the reward tokenizer has {len(tokenizer)} tokens but the reward model's vocabulary has {vocab}: "
                "they do not belong together"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        context = model_context_length(model)
        self.max_length = max_length or (context[0] if context is not None else None)
        self.pad_id = pad_token_id(tokenizer)
        self.stats = stats
        self.whiten = whiten
        if whiten and stats is None:
            raise ValueError("whiten=True needs the model's score statistics: pass stats=ScoreStats(...)")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> SequenceClassifierReward:
        """Load a sequence-classification checkpoint, with the options of its ``reward_model.json`` if it
        has one (score statistics, batch size, length budget, whitening); ``kwargs`` override them."""
        options = read_reward_metadata(path) or {}
        options.update(kwargs)
        model = load_sequence_classifier(
            path, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tok = load_tokenizer(
            tokenizer if tokenizer is not None else path, trust_remote_code=trust_remote_code
        )
        return cls(model, tok, **options)

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters, where the scores are computed."""
        return model_device(self.model)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each ``prompt + response`` (left-truncated to ``max_length``).

        A prompt that came from a conversation (a :class:`~llm_env.chat.ChatPrompt`) is scored the way a
        chat reward model was trained: when this model's tokenizer has a chat template, the conversation
        with the response as the assistant's turn is rendered by that template (its own special tokens and
        turn markers, whatever the policy's are); without one, the policy's rendered prompt plus the
        response is scored as text.
        """
        pairs = list(zip(prompts, responses, strict=True))
        chat = getattr(self.tokenizer, "chat_template", None)
        if chat and any(isinstance(p, ChatPrompt) for p, _ in pairs):
            ids = []
            for p, r in pairs:
                if isinstance(p, ChatPrompt):
                    text = conversation_text(self.tokenizer, p.messages, r)
                    ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                else:
                    ids.append(self.tokenizer(p + r)["input_ids"])
        else:
            ids = self.tokenizer([p + r for p, r in pairs])["input_ids"]
        if self.max_length:
            ids = [seq[-self.max_length :] for seq in ids]
        return ids

    def score_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of already tokenized sequences, shape ``(n,)`` float32 on the model's device."""
        device = model_device(self.model)
        out = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            lengths = torch.tensor([len(s) for s in chunk], device=device)
            if int(lengths.min()) == 0:
                raise ValueError("cannot score an empty text")
            width = int(lengths.max())
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            for i, seq in enumerate(chunk):
                input_ids[i, : len(seq)] = torch.as_tensor(seq)
            input_ids = input_ids.to(device)
            mask = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
            out.append(sequence_scores(self.model, input_ids, mask))
        return torch.cat(out) if out else torch.zeros(0, device=device)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], *, whiten: bool = False
    ) -> torch.Tensor:
        """Scores of ``prompt + response`` texts, batched, shape ``(n,)`` float32 on the model's device.

        Runs without gradients and in eval mode (dropout off), restoring the previous mode afterwards.
        With ``whiten=True`` the scores are ``(score - mean) / std`` with the saved statistics.
        """
        if isinstance(prompts, str) or isinstance(responses, str):
            raise TypeError("prompts and responses must be lists of strings, not a single string")
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                scores = self.score_ids(self.encode(prompts, responses))
        finally:
            self.model.train(was_training)
        return self.whiten_scores(scores) if whiten else scores

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.score(prompts, responses, whiten=self.whiten)

    def whiten_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - mean) / std`` with this model's score statistics."""
        if self.stats is None:
            raise ValueError(
                "this reward model has no score statistics to whiten with: train it with "
                "rewards.train_reward_model or call calibrate(prompts, responses) first"
            )
        return self.stats.whiten(scores)


def model_vocab_size_safe(model: nn.Module) -> int | None:
    """Input vocabulary size of a model, or None when it cannot be told."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        try:
            return model_vocab_size(model)
        except (AttributeError, NotImplementedError):
            return None


def sequence_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per right-padded row, read at the last position where ``attention_mask`` is 1.

    Works under autograd (the reward-model trainer uses it) and returns float32.
    """
    last = attention_mask.sum(dim=1) - 1  # (n,)
    inner = unwrap_model(model)
    head = getattr(inner, "score", None)
    backbone = getattr(inner, "base_model", None)
    if isinstance(head, nn.Module) and backbone is not None and backbone is not inner:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, T, d)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (n, d)
        return head(pooled)[:, 0].float()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[:, 0].float()


def as_reward_function(
    reward: RewardFunction | PreTrainedModel | str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    batch_size: int = 32,
) -> Callable[[Sequence[str], Sequence[str]], Any]:
    """Turn any accepted reward source into a batched callable on texts.

    ``tokenizer`` is the reward model's tokenizer; for a path it defaults to the tokenizer saved beside
    the model. A directory saved by ``rewards.RewardModel`` brings its length budget, score statistics and
    whitening choice (``reward_model.json``); ``batch_size`` always applies.
    """
    if isinstance(reward, SequenceClassifierReward):
        return reward
    if isinstance(reward, (str, os.PathLike)):
        return SequenceClassifierReward.from_pretrained(
            reward,
            tokenizer=tokenizer,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            batch_size=batch_size,
        )
    if isinstance(reward, PreTrainedModel) or (
        isinstance(reward, nn.Module) and hasattr(unwrap_model(reward), "config")
    ):
        if tokenizer is None:
            raise ValueError("a reward model object needs its tokenizer: pass reward_tokenizer=...")
        return SequenceClassifierReward(reward, load_tokenizer(tokenizer), batch_size=batch_size)
    if callable(reward):
        return reward
    raise TypeError(
        "reward must be a callable (prompts, responses) -> scores, a sequence-classification model, "
        f"or a path to one; got {type(reward).__name__}"
    )
