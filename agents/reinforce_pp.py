"""REINFORCE++ (Hu 2025, "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and
Reward Models"; OpenRLHF's ``--advantage_estimator reinforce``).

PPO's tricks without the critic. The per-token reward holds the KL (the environment's ``-beta * k1`` per
token, plus the score on the last token), the advantage of token t is the return from t on, and the
advantages are normalised over the *whole batch* of tokens rather than per prompt group (Hu argues the
per-group normalisation of GRPO overfits easy prompts and is biased for finite groups)::

    G_t = sum_{s >= t} gamma^(s - t) r_s           A_t = (G_t - mean_batch G) / std_batch G
    L   = -1/sum|y| sum_i sum_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)

``group_baseline=True`` is REINFORCE++-baseline (OpenRLHF ``reinforce_baseline``): several samples per
prompt, each score minus its group's mean score before the returns, then the same batch normalisation.
With ``kl_in="loss"`` the rewards hold only the score and the KL goes to the loss.

Reading order: :class:`ReinforcePPConfig`, :func:`reinforce_pp_advantages`, :func:`reinforce_pp_loss`,
:class:`ReinforcePPAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.pg import PGAgent, PGConfig, clip_loss, group_view
from agents.rollout import Trajectories
from llm_env.distributed import global_masked_whiten

__all__ = ["ReinforcePPAgent", "ReinforcePPConfig", "reinforce_pp_advantages", "reinforce_pp_loss"]


@dataclass
class ReinforcePPConfig(PGConfig):
    """Options of :class:`ReinforcePPAgent`: :class:`~agents.pg.PGConfig` with REINFORCE++'s defaults."""

    prompts_per_update: int = 64
    """Prompts per rollout (one response each by default: 64 episodes)."""
    group_size: int = 1
    """Responses per prompt (REINFORCE++: 1; the -baseline variant needs >= 2)."""
    kl_coef: float = 0.01
    """beta of the per-token KL in the reward (OpenRLHF ``--init_kl_coef``: 0.01)."""
    gamma: float = 1.0
    """Discount of the per-token returns (1: the score reaches every token)."""
    group_baseline: bool = False
    """REINFORCE++-baseline: subtract the mean score of the prompt's group from each score first."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.group_baseline:
            self.require_groups("REINFORCE++-baseline")


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, T) per-token rewards -> (N, T) advantages: returns-to-go ``G_t = r_t + gamma G_{t+1}``,
    whitened over every real token of the batch. ``baseline`` (N,) is subtracted from each response's last
    reward first (the -baseline variant: the group's mean score).

    On N processes the batch is every rank's: the mean and variance are those of all ranks' tokens
    (:func:`llm_env.distributed.global_masked_whiten`, a collective that every rank calls), not per rank;
    in one process it is :func:`agents.losses.masked_whiten` bit for bit."""
    maskf = mask.to(rewards.dtype)
    rewards = rewards * maskf
    if baseline is not None:
        last = (maskf.sum(dim=1).long() - 1).clamp(min=0)  # (N,) index of each response's last token
        rewards = rewards.scatter_add(1, last[:, None], -baseline.to(rewards.dtype)[:, None])
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return global_masked_whiten(returns * maskf, mask)


def reinforce_pp_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    num_tokens: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate averaged over every token of the batch."""
    return clip_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        "token-mean",
        clip_low=clip_range,
        clip_high=clip_range_high,
        num_tokens=num_tokens,
    )


class ReinforcePPAgent(PGAgent):
    """REINFORCE++ through the environment (see :class:`~agents.pg.PGAgent` for the arguments)."""

    config_class = ReinforcePPConfig
    algorithm = "reinforce-pp"
    kl_aggregation = "token-mean"
    config: ReinforcePPConfig

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        mask = trajectories.mask.to(self.device)
        rewards = trajectories.rewards.to(self.device, torch.float32)
        baseline = None
        if self.config.group_baseline:
            scores = torch.as_tensor(trajectories.scores, dtype=torch.float32, device=self.device)
            groups = group_view(scores, self.config.group_size)
            baseline = groups.mean(dim=1, keepdim=True).expand_as(groups).reshape(-1)
        return reinforce_pp_advantages(rewards, mask, gamma=self.config.gamma, baseline=baseline)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return reinforce_pp_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_tokens=totals.get("num_tokens"),
        )
