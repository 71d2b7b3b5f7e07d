"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025).

GRPO weighs each token by its own importance ratio although the reward is given to the whole response; with
long responses and mixture-of-experts models the token ratios are noisy and training can collapse. GSPO
uses one ratio per response, the length-normalised sequence likelihood ratio, and clips it::

    s_i = (pi(y_i | x) / pi_old(y_i | x)) ^ (1 / |y_i|) = exp(1/|y_i| sum_t (log pi - log pi_old))
    L   = -1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

with GRPO's group-normalised advantage A_i. Because ``s_i`` is a geometric mean of token ratios it stays near
1, and the clip range is tiny: ``eps_low = 3e-4``, ``eps_high = 4e-4`` (paper v2, section 5.1; TRL's
reproduction config), with each rollout split into 4 minibatches. With one minibatch and one epoch
``s_i = 1`` and GSPO is GRPO with sequence-level averaging. The paper trains without a KL term; here the
KL is the environment's per-token penalty by default (``kl_coef=0`` reproduces the paper).

Reading order: :class:`GSPOConfig`, :func:`gspo_advantages`, :func:`sequence_ratio`, :func:`gspo_loss`,
:class:`GSPOAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agents.grpo import grpo_advantages
from agents.losses import masked_mean
from agents.pg import PGAgent, PGConfig
from agents.rollout import Trajectories

__all__ = ["GSPOAgent", "GSPOConfig", "gspo_advantages", "gspo_loss", "sequence_ratio"]


@dataclass
class GSPOConfig(PGConfig):
    """Options of :class:`GSPOAgent`: :class:`~agents.pg.PGConfig` with GSPO's defaults."""

    minibatch_size: int | None = 16
    """Episodes per optimizer step (GSPO: each rollout in 4 minibatches; 64 episodes / 4)."""
    clip_range: float = 3e-4
    """Lower clip epsilon of the sequence ratio (GSPO paper v2, section 5.1: 3e-4)."""
    clip_range_high: float | None = 4e-4
    """Upper clip epsilon of the sequence ratio (GSPO: 4e-4)."""
    std_eps: float = 1e-4
    """Added to the group's std before dividing (as GRPO)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_groups("GSPO")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")


def gspo_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4) -> torch.Tensor:
    """(N,) -> (N,): GRPO's group-normalised advantage."""
    return grpo_advantages(rewards, group_size, eps=eps)


def sequence_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T) -> (N,): ``s_i = exp(mean over the tokens of y_i of (log pi - log pi_old))``."""
    maskf = mask.to(logprobs.dtype)
    lengths = maskf.sum(dim=1).clamp(min=1.0)
    return torch.exp(((logprobs - old_logprobs) * maskf).sum(dim=1) / lengths)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 3e-4,
    clip_range_high: float | None = 4e-4,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``; ``advantages`` is (N, T) and
    constant over each response's tokens (its per-response mean is used), or (N,)."""
    clip_range_high = clip_range if clip_range_high is None else clip_range_high
    ratio = sequence_ratio(logprobs, old_logprobs, mask)  # (N,)
    if advantages.dim() == 2:
        maskf = mask.to(advantages.dtype)
        advantages = (advantages * maskf).sum(dim=1) / maskf.sum(dim=1).clamp(min=1.0)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range_high)
    per_sequence = torch.maximum(unclipped, clipped)
    sequences = float(len(per_sequence) if num_sequences is None else num_sequences)
    loss = per_sequence.sum() / sequences
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats = {
            "clipfrac": (clipped > unclipped).float().mean(),  # share of responses clipped
            "approx_kl": masked_mean(log_ratio.exp() - 1.0 - log_ratio, mask),
            "ratio": ratio.mean(),
        }
    return loss, stats


class GSPOAgent(PGAgent):
    """GSPO through the environment (see :class:`~agents.pg.PGAgent` for the arguments)."""

    config_class = GSPOConfig
    algorithm = "gspo"
    kl_aggregation = "seq-mean-token-mean"  # per response, then over responses, like its policy term
    config: GSPOConfig

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        return gspo_advantages(
            self.sequence_rewards(trajectories), self.config.group_size, eps=self.config.std_eps
        )

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return gspo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_sequences=totals.get("num_sequences"),
        )
