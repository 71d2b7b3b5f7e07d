"""Optimizer and learning-rate schedule construction shared by every trainer (PPO, SFT, reward models)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["Schedule", "make_optimizer", "make_scheduler", "trainable_parameters"]

Schedule = Literal["constant", "linear", "cosine"]
"""The learning-rate schedules of :func:`make_scheduler` after its linear warmup: constant, linear or
cosine decay."""


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """Parameters that require gradients, each once, in a deterministic order."""
    seen, params = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def make_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-5,
    weight_decay: float = 0.0,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); the defaults are Llama 2's RLHF settings (betas 0.9/0.95, eps 1e-5).
    ``params`` may be parameter groups (dicts with their own ``lr``), as for PPO's value head."""
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters: is everything frozen?")
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    completed_steps: int = 0,
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear or cosine decay to ``min_ratio`` of the peak at ``total_steps``.

    Llama 2 decays its reward models' learning rate with a cosine to 10% (``min_ratio=0.1``).

    ``completed_steps`` positions a schedule rebuilt after a resume exactly where the interrupted one was
    (the optimizer's param groups must then hold their ``initial_lr``, as a restored optimizer does).
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
    total_steps, warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=completed_steps - 1)
