"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025).

GRPO's group-normalised advantage with four changes (section 3 of the paper):

* **Clip-higher**: the ratio is clipped to ``[1 - eps_low, 1 + eps_high]`` with ``eps_low = 0.2`` and
  ``eps_high = 0.28``, so unlikely tokens with a positive advantage can grow (against entropy collapse).
* **Token-level loss**: the surrogate is summed over every token of the batch and divided by the number of
  tokens, ``1 / sum_i |y_i| * sum_i sum_t``, so a long response weighs in proportion to its length.
* **Dynamic sampling**: groups whose rewards are all equal have advantage 0 and give no gradient; they are
  dropped and more groups are sampled until the batch holds ``prompts_per_update`` informative groups (at
  most ``max_sampling_rounds`` rollouts; the tokens of every rollout count towards the budget). Equality
  is checked on the reward-model score, since the KL penalty in the reward makes returns almost never tie.
* **Overlong reward shaping** (eq. 13): a response longer than ``L_max - L_cache`` loses up to 1 linearly,
  ``(L_max - L_cache - |y|) / L_cache``; here ``L_max`` is the environment's ``max_new_tokens`` (the env
  truncates there) and ``L_cache`` is ``overlong_buffer`` (DAPO: 4096 of 20480, a fifth). The buffer must be
  shorter than ``L_max``: one as long would punish every response, whatever its length, and the shaping would
  then reward brevity rather than punish overlong answers (:func:`check_overlong_buffer`; ``make_env``,
  ``train`` and ``learn`` refuse it).

On N processes each rank fills its share, ``prompts_per_update / N`` informative groups, from its own shard;
after every round the ranks add up what they still miss (one collective per round, on every rank, so they stay
in lockstep) and sample again until none misses any. A rank that has its share waits for the others. If the
rounds run out, each rank learns from what it found; a rank that found nothing while others did joins the
update with rows that carry no loss (``extras["padding"]``), so the update is the one on every kept group.

DAPO trains without a KL term; here the KL is the environment's per-token penalty by default
(``kl_coef=0`` reproduces the paper). TRL's ``GRPOTrainer`` uses DAPO's token-level loss by default.

Reading order: :class:`DAPOConfig`, :func:`overlong_penalty`, :func:`informative_groups`,
:func:`dapo_advantages`, :func:`dapo_loss`, :class:`DAPOAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from agents.grpo import grpo_advantages
from agents.pg import PGAgent, PGConfig, clip_loss
from agents.rollout import Trajectories
from llm_env import EnvConfig, TextGenVectorEnv
from llm_env.distributed import all_reduce_sum, all_reduce_sums

__all__ = [
    "DAPOAgent",
    "DAPOConfig",
    "check_overlong_buffer",
    "dapo_advantages",
    "dapo_loss",
    "informative_groups",
    "overlong_penalty",
]


@dataclass
class DAPOConfig(PGConfig):
    """Options of :class:`DAPOAgent`: :class:`~agents.pg.PGConfig` with DAPO's defaults and additions."""

    group_size: int = 16
    """Responses per prompt (DAPO: 16)."""
    clip_range_high: float | None = 0.28
    """Upper clip epsilon, clip-higher (DAPO: 0.28, with clip_range 0.2 below)."""
    std_eps: float = 1e-4
    """Added to the group's std before dividing (as GRPO)."""
    dynamic_sampling: bool = True
    """Drop groups whose scores are all equal and sample more groups in their place."""
    max_sampling_rounds: int = 4
    """At most this many rollouts per update to fill the batch with informative groups (if fewer are found,
    the update uses those; if none, the last rollout as it is)."""
    overlong_buffer: int | None = None
    """L_cache, the soft-punishment interval before the length limit, in tokens (None: a fifth of the
    environment's max_new_tokens; 0 disables the shaping). It must be shorter than the environment's
    max_new_tokens, which the config does not know: ``make_env`` and ``train`` check it."""
    overlong_penalty: float = 1.0
    """The penalty at the length limit (DAPO: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.require_groups("DAPO")
        if not self.std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {self.std_eps}")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if self.overlong_buffer is not None and self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0 or None, got {self.overlong_buffer}")
        if self.overlong_penalty < 0:
            raise ValueError(f"overlong_penalty must be >= 0, got {self.overlong_penalty}")


def check_overlong_buffer(buffer: int, max_length: int) -> int:
    """Return ``buffer`` (L_cache) if DAPO's soft overlong punishment can use it with responses of at most
    ``max_length`` (L_max) tokens, else raise. The punishment starts at ``L_max - L_cache`` (Yu et al. 2025,
    eq. 13); with ``L_cache >= L_max`` it starts at or before the first token, so every response is punished
    and the shaping pays for brevity instead of punishing overlong answers."""
    if buffer < 0:
        raise ValueError(f"overlong_buffer must be >= 0, got {buffer}")
    if buffer > 0 and buffer >= max_length:
        raise ValueError(
            f"overlong_buffer ({buffer}) must be shorter than the response limit max_new_tokens ({max_length}): "
            f"DAPO's overlong punishment starts at max_new_tokens - overlong_buffer = {max_length - buffer} "
            f"tokens, so it would punish every response; pick e.g. {max_length // 5} (a fifth, as DAPO's 4096 "
            "of 20480), None for that default, or 0 to turn the shaping off"
        )
    return buffer


def overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13) of responses of ``lengths`` tokens: 0 up to
    ``max_length - buffer``, then ``factor * (max_length - buffer - |y|) / buffer`` down to ``-factor`` at
    ``max_length``, and ``-factor`` beyond. ``buffer=0`` gives 0 everywhere up to the limit; a buffer not
    shorter than ``max_length`` raises (:func:`check_overlong_buffer`)."""
    check_overlong_buffer(buffer, max_length)
    lengths = lengths.to(torch.float32)
    if buffer <= 0:
        return torch.where(lengths > max_length, -float(factor), 0.0)
    start = max_length - buffer
    return factor * ((start - lengths) / buffer).clamp(min=-1.0, max=0.0)


def informative_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """(P,) bool: the groups of ``group_size`` consecutive scores that are not all equal."""
    groups = np.asarray(scores, dtype=np.float64).reshape(-1, group_size)
    return groups.max(axis=1) > groups.min(axis=1)


def dapo_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-4) -> torch.Tensor:
    """(N,) shaped rewards -> (N,) advantages, GRPO's ``(R_i - mean) / (std + eps)``."""
    return grpo_advantages(rewards, group_size, eps=eps)


def dapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float = 0.28,
    num_tokens: Any = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-1/sum_i |y_i| * sum_i sum_t min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` (``num_tokens``:
    the minibatch's when this is a micro-batch of it)."""
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


class DAPOAgent(PGAgent):
    """DAPO through the environment (see :class:`~agents.pg.PGAgent` for the arguments)."""

    config_class = DAPOConfig
    algorithm = "dapo"
    kl_aggregation = "token-mean"
    config: DAPOConfig

    def overlong_buffer(self, max_length: int) -> int:
        """L_cache for responses of at most ``max_length`` tokens: ``config.overlong_buffer``, or a fifth of
        ``max_length`` when it is None; raises if it is not shorter than ``max_length``."""
        buffer = self.config.overlong_buffer
        return check_overlong_buffer(max_length // 5 if buffer is None else buffer, max_length)

    def make_env(
        self, prompts: Any, reward: Any, *, num_envs: int = 16, **env_kwargs: Any
    ) -> TextGenVectorEnv:
        """:meth:`PGAgent.make_env <agents.pg.PGAgent.make_env>`, refusing first an ``overlong_buffer`` not
        shorter than the environment's ``max_new_tokens``."""
        self.overlong_buffer(env_kwargs.get("max_new_tokens", EnvConfig.max_new_tokens))
        return super().make_env(prompts, reward, num_envs=num_envs, **env_kwargs)

    def check_env(self, env: TextGenVectorEnv) -> None:
        """:meth:`PGAgent.check_env <agents.pg.PGAgent.check_env>`, and the overlong buffer against the
        environment's ``max_new_tokens``."""
        super().check_env(env)
        self.overlong_buffer(env.config.max_new_tokens)

    def rollout(self, env: TextGenVectorEnv) -> Trajectories:
        """Dynamic sampling: rollouts of ``prompts_per_update`` groups until that many informative groups
        are kept (or ``max_sampling_rounds`` rollouts). ``extras`` records the groups sampled and kept and
        ``sampled_score``, the mean score of every response sampled (the kept ones score higher or lower).
        On N processes: this rank's share, ``prompts_per_update / N`` groups (see the module docstring)."""
        config = self.config
        size, wanted = config.group_size, config.prompts_per_update // self.world_size
        kept: list[Trajectories] = []
        found = sampled = tokens = rounds = 0
        scores: list[np.ndarray] = []
        last = None
        missing = wanted
        while missing > 0 and rounds < config.max_sampling_rounds:
            if found < wanted:  # a rank that has its share waits for the others
                last = self.sample(env, self.choose_prompts(env.num_prompts, rounds))
                tokens += last.num_tokens
                scores.append(last.scores)
                sampled += len(last) // size
                groups = informative_groups(last.scores, size) if config.dynamic_sampling else None
                if groups is None or groups.all():
                    keep = np.arange(len(last) // size)
                else:
                    keep = np.flatnonzero(groups)
                keep = keep[: wanted - found]
                if keep.size:
                    episodes = (keep[:, None] * size + np.arange(size)).reshape(-1)
                    kept.append(last if len(episodes) == len(last) else last.select(episodes))
                    found += keep.size
            rounds += 1
            # What every rank still misses and has found: one collective per round on every rank (lockstep).
            missing, found_anywhere = all_reduce_sum(
                torch.tensor([wanted - found, found], dtype=torch.int64, device=self.device)
            ).tolist()
        if kept:
            trajectories = Trajectories.cat(kept)
        else:  # no informative group here: the last rollout as it is, or, if other ranks found some, rows
            trajectories = last  # that only join the update's collectives
            trajectories.extras["padding"] = found_anywhere > 0
        trajectories.extras.update(
            sampled_tokens=tokens,
            groups_sampled=sampled,
            groups_kept=found,
            sampling_rounds=rounds,
            sampled_score=float(np.mean(np.concatenate(scores))),
        )
        return trajectories

    def sequence_rewards(self, trajectories: Trajectories) -> torch.Tensor:
        """The environment's return plus the overlong penalty."""
        rewards = super().sequence_rewards(trajectories)
        max_length = trajectories.extras.get("max_new_tokens")
        if max_length is None:
            return rewards
        lengths = torch.as_tensor(trajectories.lengths, device=rewards.device)
        return rewards + overlong_penalty(
            lengths, max_length, self.overlong_buffer(max_length), self.config.overlong_penalty
        )

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        return dapo_advantages(
            self.sequence_rewards(trajectories), self.config.group_size, eps=self.config.std_eps
        )

    def policy_loss(self, logprobs, old_logprobs, advantages, mask, **totals: Any):
        return dapo_loss(
            logprobs,
            old_logprobs,
            advantages,
            mask,
            clip_range=self.config.clip_range,
            clip_range_high=self.config.clip_range_high,
            num_tokens=totals.get("num_tokens"),
        )

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        stats = super().learn(trajectories)
        extras = trajectories.extras
        if "groups_sampled" in extras:  # every rank's groups and sampled responses (one collective)
            sampled = extras["groups_sampled"] * self.config.group_size
            sums = all_reduce_sums(
                {
                    "groups_sampled": extras["groups_sampled"],
                    "groups_kept": extras["groups_kept"],
                    "score": extras["sampled_score"] * sampled,
                    "responses": sampled,
                },
                self.device,
            )
            stats.update(
                groups_sampled=sums["groups_sampled"],
                groups_kept=sums["groups_kept"],
                sampling_rounds=float(extras["sampling_rounds"]),  # the same on every rank
                sampled_score=sums["score"] / max(sums["responses"], 1.0),
            )
        return stats
