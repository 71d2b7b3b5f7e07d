"""Preference data: pairs with optional Llama 2 levels or margins, and InstructGPT K-way rankings.

One row is one *comparison* of responses to one prompt, in either of two formats (they may be mixed):

* a pair: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` with an optional ``"level"`` (one of
  ``significantly_better``, ``better``, ``slightly_better``, ``negligibly_better`` / ``unsure``) and an
  optional numeric ``"margin"`` (used by the loss instead of the level's margin);
* a ranking: ``{"prompt": ..., "responses": [best, second, ..., worst]}`` with K >= 2 responses.

The text a reward model scores is ``prompt + response``, concatenated verbatim, exactly as the
environment does: put the separator (a leading space or newline) at the start of each response.
Other fields are ignored. Rows come from a JSONL file, a ``datasets.Dataset`` or any iterable of
mappings; every problem is reported with the file line (``data.jsonl:7``) or row index and the field.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from llm_env.prompts import read_jsonl
from rewards.losses import normalize_level

__all__ = ["Comparison", "PreferenceSource", "load_preferences", "save_preferences", "split_by_prompt"]

PreferenceSource = str | os.PathLike | Iterable[Any]
"""Where preferences come from: a JSONL path, or an iterable of rows as mappings (a ``datasets.Dataset``
among them) or :class:`Comparison` objects."""


@dataclass(frozen=True)
class Comparison:
    """Responses to one prompt ranked best first: a pair (K = 2) or an InstructGPT K-way ranking.

    Attributes:
        prompt: the prompt text.
        responses: ``(chosen, rejected)`` for a pair, or K responses best first.
        level: Llama 2 preference level of a pair (canonical name), or None.
        margin: explicit margin of a pair (overrides the level's margin in the loss), or None.
        where: where the row came from (``file.jsonl:12``, ``row 3``), for error messages.
        gold: gold scores of the responses when a simulated annotator made the comparison.
    """

    prompt: str
    responses: tuple[str, ...]
    level: str | None = None
    margin: float | None = None
    where: str = ""
    gold: tuple[float, ...] | None = None

    @property
    def is_pair(self) -> bool:
        """Whether this is a pair (two responses) rather than a K-way ranking."""
        return len(self.responses) == 2

    @property
    def chosen(self) -> str:
        """The preferred response: the first, the best of a ranking."""
        return self.responses[0]

    @property
    def rejected(self) -> str:
        """The rejected response: the last, the worst of a ranking."""
        return self.responses[-1]

    def to_dict(self) -> dict[str, Any]:
        """The JSONL row of this comparison (the format :func:`load_preferences` reads)."""
        if self.is_pair:
            row: dict[str, Any] = {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
            if self.level is not None:
                row["level"] = self.level
            if self.margin is not None:
                row["margin"] = self.margin
        else:
            row = {"prompt": self.prompt, "responses": list(self.responses)}
        if self.gold is not None:
            row["gold"] = list(self.gold)
        return row


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    return _check_text(row[key], f"field {key!r}", where)


def _check_text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {what} is empty")
    return value


def _comparison(row: Any, where: str) -> Comparison:
    """Validate one row and turn it into a :class:`Comparison`."""
    if isinstance(row, Comparison):  # checked like a row, so hand-built comparisons get the same checks
        checked = _comparison(row.to_dict(), row.where or where)
        return replace(checked, gold=row.gold)
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a mapping with 'prompt', got {type(row).__name__}")
    prompt = _text(row, "prompt", where)
    if row.get("responses") is not None:
        clash = [k for k in ("chosen", "rejected", "level", "margin") if row.get(k) is not None]
        if clash:
            raise ValueError(
                f"{where}: a ranking row ('responses') cannot also have {clash}; "
                "write pairs as 'chosen'/'rejected' and rankings as 'responses', one format per row"
            )
        responses = row["responses"]
        if isinstance(responses, str) or not isinstance(responses, Sequence):
            raise ValueError(f"{where}: field 'responses' must be a list of strings ranked best first")
        if len(responses) < 2:
            raise ValueError(f"{where}: field 'responses' needs at least 2 responses, got {len(responses)}")
        texts = tuple(_check_text(r, f"field 'responses' item {i}", where) for i, r in enumerate(responses))
        seen: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text in seen:
                raise ValueError(f"{where}: field 'responses' item {i} is identical to item {seen[text]}")
            seen[text] = i
        return Comparison(prompt, texts, where=where)
    chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
    if chosen == rejected:
        raise ValueError(
            f"{where}: field 'rejected' is identical to 'chosen'; a pair must compare two responses"
        )
    level = row.get("level")
    if level is not None:
        try:
            level = normalize_level(level)
        except ValueError as exc:
            raise ValueError(f"{where}: field 'level': {exc}") from None
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"{where}: field 'margin' must be a finite number, got {margin!r}")
        margin = float(margin)
    return Comparison(prompt, (chosen, rejected), level=level, margin=margin, where=where)


def load_preferences(source: PreferenceSource) -> list[Comparison]:
    """Read and validate preference data.

    Args:
        source: a path to a JSONL file, or an iterable of mappings (``datasets.Dataset``, list of dicts)
            or of :class:`Comparison` objects. A bare string is always a path.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: naming the line (files) or row (iterables) and the field, for invalid JSON, a
            missing or non-string field, an empty text, an unknown level, a non-numeric margin, a pair
            whose two responses are identical, or a row that repeats an earlier one exactly.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        rows: Iterable[tuple[str, Any]] = ((f"{path}:{line}", obj) for line, obj in read_jsonl(path))
        name = path
    elif isinstance(source, Iterable):
        rows = ((f"preference data row {i}", row) for i, row in enumerate(source))
        name = "the preference data"
    else:
        raise TypeError(f"preference data must be a path or an iterable of rows, got {type(source).__name__}")
    comparisons: list[Comparison] = []
    first_seen: dict[tuple[str, tuple[str, ...]], str] = {}
    for where, row in rows:
        comparison = _comparison(row, where)
        key = (comparison.prompt, comparison.responses)
        if key in first_seen:
            raise ValueError(
                f"{where}: duplicate of {first_seen[key]} (same prompt and responses in the same order); "
                "remove one of the two rows"
            )
        first_seen[key] = where
        comparisons.append(comparison)
    if not comparisons:
        raise ValueError(f"{name} contains no comparisons")
    return comparisons


def save_preferences(comparisons: Iterable[Comparison], path: str | os.PathLike) -> None:
    """Write comparisons as JSONL rows that :func:`load_preferences` reads back."""
    with open(path, "w", encoding="utf-8") as handle:
        for comparison in comparisons:
            handle.write(json.dumps(comparison.to_dict(), ensure_ascii=False) + "\n")


def split_by_prompt(
    comparisons: Sequence[Comparison], eval_fraction: float, seed: int
) -> tuple[list[Comparison], list[Comparison]]:
    """Split into train and held-out comparisons, keeping all comparisons of one prompt on one side.

    Splitting by prompt rather than by row keeps held-out accuracy honest: a model that saw other
    responses to the same prompt in training would be evaluated on a prompt it already knows.
    About ``eval_fraction`` of the prompts (at least one) go to the held-out side.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0:
        return list(comparisons), []
    prompts = list(dict.fromkeys(c.prompt for c in comparisons))
    if len(prompts) < 2:
        raise ValueError(
            "cannot hold out a fraction of the prompts: the data has a single prompt; "
            "set eval_fraction=0 or pass separate eval data"
        )
    order = np.random.default_rng(seed).permutation(len(prompts))
    num_eval = min(len(prompts) - 1, max(1, round(eval_fraction * len(prompts))))
    held_out = {prompts[i] for i in order[:num_eval]}
    train = [c for c in comparisons if c.prompt not in held_out]
    held = [c for c in comparisons if c.prompt in held_out]
    return train, held
