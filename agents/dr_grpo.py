"""Dr. GRPO: GRPO Done Right (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

Liu et al. show two biases in GRPO's objective. Dividing each response's loss by its length ``|y_i|`` makes
a token of a short response weigh more than one of a long response: correct answers are pushed to be short
and wrong ones to grow long. Dividing the advantage by the group's std up-weights prompts that are too easy
or too hard (small std). Dr. GRPO removes both::

    A_i = R_i - mean_j R_j
    L   = -1/G sum_i 1/L_max sum_t min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i)

with the constant ``L_max`` (here the environment's ``max_new_tokens``; TRL's ``loss_type="dr_grpo"``
divides by ``max_completion_length`` likewise). The paper trains without a KL term; here the KL is the
environment's per-token penalty by default (``kl_coef=0`` reproduces the paper).

Reading order: :class:`DrGRPOConfig`, :func:`dr_grpo_advantages`, :func:`dr_grpo_loss`, :class:`DrGRPOAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.grpo import grpo_advantages
from agents.pg import PGAgent, PGConfig, clip_loss
from agents.rollout import Trajectories

__all__ = ["DrGRPOAgent", "DrGRPOConfig", "dr_grpo_advantages", "dr_grpo_loss"]


@dataclass
class DrGRPOConfig(PGConfig):
    """Options of :class:`DrGRPOAgent`: :class:`~agents.pg.PGConfig` with Dr. GRPO's additions."""

    max_length: int | None = None
    """The constant L_max dividing each response's token sum (None: the environment's max_new_tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_groups("Dr. GRPO")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {self.max_length}")


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N,): ``R_i - mean_group`` (GRPO's advantage without the std division)."""
    return grpo_advantages(rewards, group_size, scale=False)


def dr_grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_length: int,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/(G L_max) sum_i sum_t min(rho A, clip(rho) A)``: every token weighs the same, whatever the
    length of its response."""
    return clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        "seq-mean-token-sum-norm",
        clip_low=clip_range,
        clip_high=clip_range_high,
        num_sequences=num_sequences,
        max_length=max_length,
    )


class DrGRPOAgent(PGAgent):
    """Dr. GRPO through the environment (see :class:`~agents.pg.PGAgent` for the arguments)."""

    config_class = DrGRPOConfig
    algorithm = "dr-grpo"
    kl_aggregation = "seq-mean-token-sum-norm"
    config: DrGRPOConfig

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        return dr_grpo_advantages(self.sequence_rewards(trajectories), self.config.group_size)

    def length_normaliser(self, trajectories: Trajectories) -> int | None:
        return self.config.max_length or trajectories.extras.get("max_new_tokens")

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        if totals.get("max_length") is None:
            raise ValueError("Dr. GRPO needs L_max: set max_length or collect with agent.rollout(env)")
        return dr_grpo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            max_length=totals["max_length"],
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_sequences=totals.get("num_sequences"),
        )
