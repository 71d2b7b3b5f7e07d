"""ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for
Aligning Large Language Models").

REINFORCE on the whole response with one extra rollout per prompt as the baseline: the reward of the
*greedy* response. It needs no critic and no group of samples, and the greedy reward is a good, prompt-
specific estimate of how well the policy already does::

    A_i = R(x, y_i) - R(x, y_greedy(x))
    L   = -A_i log pi(y_i | x) = -A_i sum_t log pi(y_it | ...)

R is the environment's return, so with the KL in the reward the greedy response pays its KL too. The greedy
responses are generated through the same environment (their tokens count towards the token budget). With
several epochs or minibatches the per-token ratio is clipped as in PPO, summed over the response. On N
processes each rank decodes the greedy responses of its own prompts (no collective inside the rollout, so
the ranks stay in lockstep) and the logged greedy score is the mean over every rank's prompts.

Reading order: :class:`ReMaxConfig`, :func:`remax_advantages`, :func:`remax_loss`, :class:`ReMaxAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents.pg import PGAgent, PGConfig, clip_loss
from agents.policy import TokenSampler
from agents.rollout import Trajectories, collect_episodes
from llm_env import TextGenVectorEnv
from llm_env.distributed import all_reduce_sums, rank_seed

__all__ = ["ReMaxAgent", "ReMaxConfig", "remax_advantages", "remax_loss"]


@dataclass
class ReMaxConfig(PGConfig):
    """Options of :class:`ReMaxAgent`: :class:`~agents.pg.PGConfig` with ReMax's defaults."""

    prompts_per_update: int = 64
    """Prompts per rollout (one sampled and one greedy response each)."""
    group_size: int = 1
    """Sampled responses per prompt (ReMax: 1); all share the prompt's greedy baseline."""
    kl_coef: float = 0.1
    """beta of the KL penalty (DeepSpeed-Chat's ``kl_ctl``, on which ReMax's code is built: 0.1)."""


def remax_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) sampled rewards and (N / group_size,) greedy rewards of their prompts -> (N,) ``R_i - R_greedy``."""
    if rewards.shape[0] != greedy_rewards.shape[0] * group_size:
        raise ValueError(
            f"{rewards.shape[0]} rewards for {greedy_rewards.shape[0]} greedy baselines of groups of {group_size}"
        )
    return rewards - greedy_rewards.repeat_interleave(group_size)


def remax_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/N sum_i sum_t min(rho A_i, clip(rho) A_i)``: REINFORCE on the sequence log-probability at ratio 1."""
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


class ReMaxAgent(PGAgent):
    """ReMax through the environment (see :class:`~agents.pg.PGAgent` for the arguments).

    :attr:`greedy_sampler` decodes the greedy baselines with the same policy (and the environment's fused
    policy logits when there are some).
    """

    config_class = ReMaxConfig
    algorithm = "remax"
    kl_aggregation = "seq-mean-token-sum"
    config: ReMaxConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.greedy_sampler = TokenSampler(
            self.policy, temperature=self.config.temperature, greedy=True, cuda_graph=self.config.cuda_graphs
        )

    def attach(self, env: TextGenVectorEnv) -> None:
        super().attach(env)
        self.greedy_sampler.attach(env)

    def rollout(self, env: TextGenVectorEnv) -> Trajectories:
        """The sampled responses, then one greedy response per prompt; ``extras["greedy_returns"]`` holds the
        greedy rewards (prompt order) and ``extras["sampled_tokens"]`` counts both rollouts' tokens."""
        trajectories = super().rollout(env)
        prompts = trajectories.prompt_index[:: self.config.group_size]
        greedy = collect_episodes(
            env,
            self.greedy_sampler,
            len(prompts),
            seed=rank_seed(self.config.seed + self.update),
            prompt_indices=prompts,
        )
        trajectories.extras["greedy_returns"] = greedy.returns
        trajectories.extras["greedy_score"] = float(np.mean(greedy.scores))
        trajectories.extras["greedy_episodes"] = len(greedy)
        trajectories.extras["sampled_tokens"] += greedy.num_tokens
        return trajectories

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        if "greedy_returns" not in trajectories.extras:
            raise ValueError(
                "ReMax needs the greedy baseline of each prompt: collect with agent.rollout(env)"
            )
        greedy = torch.as_tensor(
            trajectories.extras["greedy_returns"], dtype=torch.float32, device=self.device
        )
        return remax_advantages(self.sequence_rewards(trajectories), greedy, self.config.group_size)

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return remax_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_sequences=totals.get("num_sequences"),
        )

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        stats = super().learn(trajectories)
        extras = trajectories.extras
        if "greedy_score" in extras:  # the mean over every rank's greedy responses (one collective)
            count = extras.get("greedy_episodes", 1)
            sums = all_reduce_sums({"score": extras["greedy_score"] * count, "count": count}, self.device)
            stats["greedy_score"] = sums["score"] / sums["count"]
        return stats
