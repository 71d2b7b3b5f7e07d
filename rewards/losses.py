"""Reward-model losses: plain functions on score tensors.

A reward model ``r(x, y)`` is trained so that a preferred response scores higher than a rejected one.
Every loss here is the negative log-likelihood of some preference model built on score *differences*:

* Bradley-Terry (Bradley & Terry 1952; Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022,
  "InstructGPT", eq. 1): ``P(y_c > y_r) = sigma(r_c - r_r)``.
* Llama 2 (Touvron et al. 2023, section 3.2.2, eq. 2 and Table 27): the same with a margin
  ``m(level)`` that grows with how strongly the annotator preferred ``y_c``.
* InstructGPT K-way rankings (Ouyang et al. 2022, section 3.5): all ``K choose 2`` pairs of one prompt
  form one batch element and their losses are averaged, so a prompt with many responses does not
  dominate the batch and each response is encoded once (not once per pair, which also overfits).
* Reward centering (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do
  not Eliminate Reward Hacking"): the Bradley-Terry likelihood is invariant to adding a constant to every
  score, so a small penalty ``c * mean((r_c + r_r)^2)`` pins the free constant near zero.

Scores are ``(n,)`` float tensors; every function works under autograd and on any device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "LEVELS",
    "MARGIN_TABLES",
    "bradley_terry_loss",
    "centering_penalty",
    "comparison_loss",
    "level_margins",
    "llama2_margin_loss",
    "normalize_level",
    "ranking_loss",
    "ranking_pairs",
]

LEVELS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")
"""Llama 2's four preference levels, strongest first (the last one also stands for "unsure")."""

_LEVEL_ALIASES = {"unsure": "negligibly_better", "negligibly_better_or_unsure": "negligibly_better"}

MARGIN_TABLES: dict[str, dict[str, float]] = {
    # Llama 2, Table 27: "Margin Small" and "Margin Large".
    "small": dict(zip(LEVELS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0))),
    "large": dict(zip(LEVELS, (3.0, 2.0, 1.0, 0.0))),
}
"""Llama 2's two margin tables (Touvron et al. 2023, Table 27, "Margin Small" and "Margin Large"): level ->
margin ``m(r)`` subtracted from the score difference in :func:`llama2_margin_loss`, larger for pairs the
annotator found more distinct."""

MarginTable = Literal["small", "large"] | Mapping[str, float]


def normalize_level(label: str) -> str:
    """Canonical name of a preference level.

    Case, spaces and hyphens are ignored (``"Significantly Better"`` is ``"significantly_better"``) and
    ``"unsure"`` means ``"negligibly_better"`` (Llama 2 merges them into one level).

    Raises:
        ValueError: for a label that is not one of the four levels.
    """
    if not isinstance(label, str):
        raise ValueError(f"a preference level must be a string, got {type(label).__name__}")
    key = label.strip().lower().replace("-", "_").replace(" ", "_").replace("/", "_or_")
    key = _LEVEL_ALIASES.get(key, key)
    if key not in LEVELS:
        raise ValueError(f"unknown preference level {label!r}; use one of {[*LEVELS, 'unsure']}")
    return key


def level_margins(
    levels: Sequence[str], table: MarginTable = "small", *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Margins ``m(level)`` of Llama 2's loss for a batch of level labels, shape ``(n,)`` float32.

    Args:
        levels: one label per pair (see :func:`normalize_level`).
        table: ``"small"`` (1, 2/3, 1/3, 0), ``"large"`` (3, 2, 1, 0), or a mapping level -> margin.
    """
    if isinstance(table, str):
        if table not in MARGIN_TABLES:
            raise ValueError(
                f"unknown margin table {table!r}; use 'small', 'large' or a mapping level -> margin"
            )
        mapping = MARGIN_TABLES[table]
    else:
        mapping = {normalize_level(k): float(v) for k, v in table.items()}
        missing = [level for level in LEVELS if level not in mapping]
        if missing:
            raise ValueError(f"the margin table has no margin for levels {missing}")
    return torch.tensor([mapping[normalize_level(x)] for x in levels], dtype=torch.float32, device=device)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``mean(-log sigma(r_c - r_r - m))``: the Bradley-Terry negative log-likelihood of the labels.

    InstructGPT eq. 1 with ``margin=None``; with a margin it is Llama 2's eq. 2. ``logsigmoid`` is used
    rather than ``log(sigmoid(.))``, which underflows to ``-inf`` for large negative differences.
    """
    diff = chosen - rejected  # (n,)
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    return -F.logsigmoid(diff).mean()


def llama2_margin_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    levels_or_margins: Sequence[str] | torch.Tensor | Sequence[float],
    table: MarginTable = "small",
) -> torch.Tensor:
    """Llama 2's margin loss ``mean(-log sigma(r_c - r_r - m(level)))`` (Touvron et al. 2023, eq. 2).

    The margin is large for pairs the annotator found clearly separable, so the model is pushed to give
    them a large score gap, and zero for "negligibly better / unsure" pairs.

    Args:
        levels_or_margins: one level label per pair (mapped through ``table``) or one numeric margin
            per pair (``table`` is then unused).
        table: ``"small"``, ``"large"`` (Table 27) or a mapping level -> margin.
    """
    if isinstance(levels_or_margins, torch.Tensor):
        margin = levels_or_margins
    elif len(levels_or_margins) and all(isinstance(x, str) for x in levels_or_margins):
        margin = level_margins(levels_or_margins, table, device=chosen.device)  # type: ignore[arg-type]
    else:
        margin = torch.as_tensor(levels_or_margins, dtype=torch.float32, device=chosen.device)
    if margin.shape != chosen.shape:
        raise ValueError(f"got {tuple(margin.shape)} margins for {tuple(chosen.shape)} pairs")
    return bradley_terry_loss(chosen, rejected, margin)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """``coef * mean((r_c + r_r)^2)``: keeps scores centred on zero (Eisenstein et al. 2023).

    The pairwise losses only see differences, so the mean score drifts freely; centering makes scores
    of separately trained models comparable and keeps the RL reward scale stable.
    """
    return coef * (chosen + rejected).pow(2).mean()


def comparison_loss(
    better: torch.Tensor,
    worse: torch.Tensor,
    group: torch.Tensor,
    margin: torch.Tensor | None = None,
    *,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """The loss of a batch of comparison groups, each a pair or a K-way ranking of one prompt.

    For pair ``p`` of group ``g = group[p]``, ``l_p = -log sigma(better_p - worse_p - margin_p)
    + center_coef * (better_p + worse_p)^2``. The loss averages ``l_p`` within each group, then over the
    groups: InstructGPT's treatment of a ranking as one batch element. For a batch of plain pairs (one
    pair per group) this is exactly :func:`bradley_terry_loss` (+ :func:`centering_penalty`).

    Args:
        better, worse: ``(P,)`` scores of the preferred and the other response of each pair.
        group: ``(P,)`` int64 group index of each pair, in ``[0, G)``; every group has at least one pair.
        margin: ``(P,)`` margins or None.
        center_coef: coefficient of the centering penalty (0 disables it).
    """
    diff = better - worse  # (P,)
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    per_pair = -F.logsigmoid(diff)  # (P,)
    if center_coef:
        per_pair = per_pair + center_coef * (better + worse).pow(2)
    num_groups = int(group.max()) + 1
    sums = torch.zeros(num_groups, dtype=per_pair.dtype, device=per_pair.device).index_add(0, group, per_pair)
    counts = torch.bincount(group, minlength=num_groups).to(per_pair.dtype)  # (G,)
    if bool((counts == 0).any()):
        raise ValueError("every group index in [0, max(group)] must have at least one pair")
    return (sums / counts).mean()


def ranking_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(i, j)``, ``i < j``, of the ``K choose 2`` pairs of a ranking listed best first."""
    i, j = torch.triu_indices(k, k, offset=1)
    return i, j


def ranking_loss(
    scores: torch.Tensor,
    num_responses: torch.Tensor | Sequence[int] | None = None,
    *,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """InstructGPT's K-way ranking loss (Ouyang et al. 2022, eq. 1).

    ``loss = -1/(K choose 2) * sum_{i<j} log sigma(r_i - r_j)`` per prompt (response ``i`` ranked above
    ``j``), averaged over the prompts of the batch.

    Args:
        scores: ``(B, K)`` scores of each prompt's responses, ranked best first.
        num_responses: ``(B,)`` number of real responses per row when rows have different K (the rest
            of the row is padding and ignored); None means all K are real.
        center_coef: centering penalty over the pairs (see :func:`comparison_loss`).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape (B, K) with K >= 2, got {tuple(scores.shape)}")
    B, K = scores.shape
    i, j = ranking_pairs(K)  # (P0,) each
    i, j = i.to(scores.device), j.to(scores.device)
    group = torch.arange(B, device=scores.device).repeat_interleave(len(i))  # (B * P0,)
    i, j = i.repeat(B), j.repeat(B)
    if num_responses is not None:
        k = torch.as_tensor(num_responses, device=scores.device)
        if bool((k < 2).any()) or bool((k > K).any()):
            raise ValueError(f"num_responses must be in [2, {K}], got {k.tolist()}")
        keep = j < k[group]  # i < j, so j real implies i real
        i, j, group = i[keep], j[keep], group[keep]
    return comparison_loss(scores[group, i], scores[group, j], group, center_coef=center_coef)
