"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath", section 4.1).

For every prompt the policy samples a group of G responses; the group is the baseline, so there is no
critic. Each response's reward is compared with its group's (outcome supervision, eq. 3 and section 4.1.2)::

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)            the same for every token of y_i

and the loss is PPO's clipped surrogate averaged over each response's tokens, then over the group::

    L = -1/G sum_i 1/|y_i| sum_t min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i)   [+ beta KL]

DeepSeekMath puts the KL in the loss with beta 0.04 and the k3 estimator (eq. 4). Our default is the
environment's per-token penalty (``kl_in="reward"``): R_i is then the score minus the summed KL, paid with k1,
the estimator whose score-function gradient is that of KL(pi || pi_ref). With ``kl_in="loss"`` the default
estimator is k2, whose gradient through ``log pi`` is that of KL(pi || pi_ref); k3's there is the gradient of
the other direction, KL(pi_ref || pi) (Tang & Munos 2025; Schulman, http://joschu.net/blog/kl-approx.html).
``kl_in="loss", kl_estimator="k3"`` reproduces DeepSeekMath, with a
:class:`~llm_env.kl.KLGradientBiasWarning`. The std uses Bessel's correction and ``eps = 1e-4``, as TRL's
``GRPOTrainer``; it needs two responses per prompt at least (``group_size >= 2``).

Reading order: :class:`GRPOConfig`, :func:`grpo_advantages`, :func:`grpo_loss`, :class:`GRPOAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.pg import PGAgent, PGConfig, check_group_size, clip_loss, group_view
from agents.rollout import Trajectories

__all__ = ["GRPOAgent", "GRPOConfig", "grpo_advantages", "grpo_loss"]


@dataclass
class GRPOConfig(PGConfig):
    """Options of :class:`GRPOAgent`: :class:`~agents.pg.PGConfig` with GRPO's defaults. ``kl_estimator``
    keeps PGConfig's default, None: k1 in the reward, k2 in the loss (not GRPO's k3, whose gradient is biased
    in either place; see the module docstring)."""

    std_eps: float = 1e-4
    """Added to the group's std before dividing (TRL's GRPOTrainer: 1e-4)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_groups("GRPO")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps must be > 0 (a group of equal rewards has std 0), got {self.std_eps}")


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """(N,) sequence rewards, groups of ``group_size`` consecutive responses -> (N,) advantages
    ``(R_i - mean_group) / (std_group + eps)`` (Bessel-corrected std); ``scale=False`` keeps ``R_i - mean``
    (Dr. GRPO). A group of equal rewards gets advantages 0. A group of one raises: its Bessel std is NaN
    (``n - 1 = 0``) and ``R_i - mean`` is 0, so there is nothing to compare with (``group_size >= 2``)."""
    check_group_size(group_size, "GRPO's group-normalised advantage")
    groups = group_view(rewards, group_size)  # (P, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/G sum_i 1/|y_i| sum_t min(rho A, clip(rho) A)`` on (N, T) tensors (``num_sequences``: the
    minibatch's when this is a micro-batch of it)."""
    return clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        "seq-mean-token-mean",
        clip_low=clip_range,
        clip_high=clip_range_high,
        num_sequences=num_sequences,
    )


class GRPOAgent(PGAgent):
    """GRPO through the environment: G forced responses per prompt, group-normalised advantages, PPO clip.

    See :class:`~agents.pg.PGAgent` for the arguments, :meth:`~agents.pg.PGAgent.make_env` and
    :meth:`~agents.pg.PGAgent.train`.
    """

    config_class = GRPOConfig
    algorithm = "grpo"
    kl_aggregation = "seq-mean-token-mean"  # the KL term is averaged like the policy term (eq. 3)
    config: GRPOConfig

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        return grpo_advantages(
            self.sequence_rewards(trajectories), self.config.group_size, eps=self.config.std_eps
        )

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return grpo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_sequences=totals.get("num_sequences"),
        )
