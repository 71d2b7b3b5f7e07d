"""Prompt sources, tokenization and the per-sub-environment prompt order.

Prompts come from a list of strings, a JSONL file with one ``{"prompt": ...}`` object per line, or any
iterable of strings or mappings (a ``datasets.Dataset`` iterates as mappings, so it works without
``datasets`` being a dependency). A prompt may also be a conversation, a list of ``{"role", "content"}``
messages, rendered with the tokenizer's chat template (:mod:`llm_env.chat`). Every malformed entry is reported with its line number (files) or its
position (iterables) and the field at fault, and nothing is skipped silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from llm_env.chat import Conversation, as_conversation, render

__all__ = [
    "Prompt",
    "PromptOrder",
    "PromptSampler",
    "PromptSource",
    "load_prompts",
    "read_jsonl",
    "tokenize_prompts",
]

PromptSource = str | os.PathLike | Iterable[Any]
"""Where prompts come from: a JSONL path (one ``{"prompt": ...}`` object per line) or an iterable of strings,
conversations or mappings with a ``prompt`` field (a ``datasets.Dataset`` among them)."""
Prompt = str | Conversation
"""One prompt: a plain string, or a conversation rendered with the tokenizer's chat template."""
PromptOrder = Literal["shuffle", "sequential"]
"""The order in which a sub-environment draws prompts: a seeded shuffle per pass, or the source's order."""


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL file into ``(line_number, object)`` pairs; blank lines are allowed and skipped.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming ``path:line`` for a line that
    is not valid JSON or not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{line_number}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}")
            rows.append((line_number, obj))
    return rows


def _prompt(value: Any, key: str, where: str) -> Prompt:
    if isinstance(value, Mapping):
        if key not in value:
            raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(value)})")
        value = value[key]
    conversation = as_conversation(value, f"{where}: field {key!r}")
    if conversation is not None:
        return conversation
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: field {key!r} must be a string or a list of chat messages, got {type(value).__name__}"
        )
    if not value.strip():
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def load_prompts(source: PromptSource, *, key: str = "prompt") -> list[Prompt]:
    """Return the prompts of ``source``: strings, and conversations (lists of ``{"role", "content"}`` dicts).

    Args:
        source: a path to a ``.jsonl`` file, or an iterable of strings, conversations or mappings
            (``datasets.Dataset``, list of dicts, generator, ...). A bare string is always a path: wrap a
            single prompt in a list.
        key: the field holding the prompt (text or conversation) in JSONL objects and mappings, e.g.
            ``"messages"``.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"prompt file not found: {path} (a string is read as a path; pass a list for literal prompts)"
            )
        prompts = [_prompt(obj, key, f"{path}:{line}") for line, obj in read_jsonl(path)]
        where = path
    elif isinstance(source, Iterable):
        prompts = [_prompt(item, key, f"prompt source item {i}") for i, item in enumerate(source)]
        where = "the prompt source"
    else:
        raise TypeError(f"prompts must be a path or an iterable, got {type(source).__name__}")
    if not prompts:
        raise ValueError(f"{where} contains no prompts")
    return prompts


def tokenize_prompts(
    prompts: Sequence[Prompt],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None,
    truncation_side: Literal["left", "right"] | None,
    chat_template: bool,
    vocab_size: int,
) -> tuple[list[str], list[np.ndarray]]:
    """The text and the token ids of every prompt, truncated as configured.

    Conversations (and, with ``chat_template``, text prompts as one user message) are rendered with the
    tokenizer's chat template up to the assistant's turn; their text is a :class:`~llm_env.chat.ChatPrompt`
    carrying the messages. Plain texts are tokenized in one batched call. All prompts are checked up front,
    so a prompt that does not fit fails at construction, naming its index, rather than in the middle of
    training.
    """
    texts: list[str] = []
    encoded: list[Any] = []
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str) and not chat_template]
    plain_ids = dict(zip(plain, tokenizer([prompts[i] for i in plain])["input_ids"])) if plain else {}
    for index, prompt in enumerate(prompts):
        if index in plain_ids:
            texts.append(prompt)
            encoded.append(plain_ids[index])
            continue
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text, ids = render(tokenizer, messages)
        texts.append(text)
        encoded.append(ids)
    out = []
    for index, (text, ids) in enumerate(zip(texts, encoded)):
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"prompt {index} tokenizes to zero tokens: {text!r}")
        if max_length is not None and ids.size > max_length:
            if truncation_side is None:
                raise ValueError(
                    f"prompt {index} has {ids.size} tokens, more than max_prompt_length={max_length}; raise "
                    "max_prompt_length or pass truncation_side='left' (keep the end) or 'right' (keep the start)"
                )
            ids = ids[-max_length:] if truncation_side == "left" else ids[:max_length]
        if ids.max() >= vocab_size or ids.min() < 0:
            raise ValueError(
                f"prompt {index} contains token id {int(ids.max())} but the vocabulary has {vocab_size} ids: "
                "the tokenizer does not match the model"
            )
        out.append(ids)
    return texts, out


class PromptSampler:
    """The prompt order of one sub-environment.

    ``"shuffle"`` walks through a fresh random permutation of all prompts each epoch, drawn from the
    sub-environment's own generator, so ``reset(seed=s)`` always gives the same order and the vector env's
    sub-environment ``i`` matches a single env reset with ``seed=s + i`` (Gymnasium's convention).
    ``"sequential"`` takes prompts ``start, start + stride, ...`` (wrapping around), so B sub-environments
    with ``start=i, stride=B`` visit every prompt exactly once per pass: the right order for evaluation.
    """

    def __init__(self, num_prompts: int, order: PromptOrder, start: int = 0, stride: int = 1) -> None:
        if order not in ("shuffle", "sequential"):
            raise ValueError(f"prompt_order must be 'shuffle' or 'sequential', got {order!r}")
        self.num_prompts, self.order, self.start, self.stride = num_prompts, order, start, stride
        self.restart()

    def restart(self) -> None:
        """Start the order again from the beginning (called on a seeded reset)."""
        self._perm: np.ndarray | None = None
        self._pos = 0

    def next(self, rng: np.random.Generator) -> int:
        """Index of the next prompt."""
        if self.order == "sequential":
            index = (self.start + self._pos * self.stride) % self.num_prompts
            self._pos += 1
            return index
        if self._perm is None or self._pos >= self.num_prompts:
            self._perm, self._pos = rng.permutation(self.num_prompts), 0
        index = int(self._perm[self._pos])
        self._pos += 1
        return index


def validate_indices(indices: Sequence[int] | np.ndarray, num_prompts: int, what: str) -> np.ndarray:
    """Check user-forced prompt indices (``reset(options=...)``)."""
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= num_prompts)
    if bad.any():
        raise ValueError(f"{what} out of range [0, {num_prompts}): {arr[bad].tolist()}")
    return arr.astype(np.int64)
