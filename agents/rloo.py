"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs"; Kool et al. 2019 for the estimator).

The whole response is one action. With k samples per prompt, each sample's baseline is the mean reward of
the *other* k - 1 samples, which keeps the estimator unbiased (the baseline does not depend on the sample)::

    A_i = R_i - 1/(k - 1) sum_{j != i} R_j  =  k/(k - 1) (R_i - mean_j R_j)
    L   = -1/k sum_i A_i log pi(y_i | x) = -1/k sum_i A_i sum_t log pi(y_it | ...)

R_i is the sequence reward with the KL in it (k1, the environment's per-token penalty summed; TRL: beta
0.05). With several epochs or minibatches the per-token ratio is clipped as in PPO (at ratio 1 the gradient
is exactly REINFORCE's), summed over each response's tokens and averaged over responses.

Reading order: :class:`RLOOConfig`, :func:`rloo_advantages`, :func:`rloo_loss`, :class:`RLOOAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.pg import PGAgent, PGConfig, check_group_size, clip_loss, group_view
from agents.rollout import Trajectories

__all__ = ["RLOOAgent", "RLOOConfig", "rloo_advantages", "rloo_loss"]


@dataclass
class RLOOConfig(PGConfig):
    """Options of :class:`RLOOAgent`: :class:`~agents.pg.PGConfig` with RLOO's defaults."""

    prompts_per_update: int = 16
    """Prompts per rollout (16 x k=4: 64 episodes)."""
    group_size: int = 4
    """k, samples per prompt (Ahmadian et al.: k = 4 did best of 2 and 4)."""
    kl_coef: float = 0.05
    """beta of the KL in the sequence reward (TRL's RLOO: 0.05)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_groups("RLOO")


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N,): ``R_i`` minus the mean of the other ``group_size - 1`` rewards of its group. A group of one
    raises: it has no other reward to average (the mean divides by ``k - 1 = 0``; ``group_size >= 2``)."""
    check_group_size(group_size, "RLOO's leave-one-out baseline")
    groups = group_view(rewards, group_size)  # (P, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def rloo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/k sum_i sum_t min(rho A_i, clip(rho) A_i)``: REINFORCE on the sequence log-probability at
    ratio 1, PPO-clipped per token off-policy."""
    return clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        "seq-mean-token-sum",
        clip_low=clip_range,
        clip_high=clip_range_high,
        num_sequences=num_sequences,
    )


class RLOOAgent(PGAgent):
    """RLOO through the environment (see :class:`~agents.pg.PGAgent` for the arguments)."""

    config_class = RLOOConfig
    algorithm = "rloo"
    kl_aggregation = "seq-mean-token-sum"
    config: RLOOConfig

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        return rloo_advantages(self.sequence_rewards(trajectories), self.config.group_size)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return rloo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_sequences=totals.get("num_sequences"),
        )
