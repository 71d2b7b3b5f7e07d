"""Llama 2's iterative RLHF: rounds V1..Vn of rejection sampling, then PPO on top of the last round.

Touvron et al. (2023), section 3.2.3: up to RLHF-V4 the models were trained with rejection sampling
only, each round pooling the best samples of all earlier rounds; PPO was then applied on top of the
rejection-sampling model. The PPO reference is configurable: the SFT model (what the paper's KL penalty
is written against) or the model PPO starts from (the previous round).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from agents.ppo import PPOAgent, PPOConfig
from agents.rejection import RejectionSamplingAgent, RejectionSamplingConfig
from llm_env.models import load_causal_lm, load_tokenizer, resolve_device

__all__ = ["IterativeConfig", "IterativeResult", "iterative_rlhf"]


@dataclass
class IterativeConfig:
    """Options of :func:`iterative_rlhf`."""

    rs_rounds: int = 2
    """Rejection-sampling rounds (model versions V1..Vn) before PPO."""
    ppo_updates: int = 10
    """PPO updates on top of the last rejection-sampling model (0: stop after rejection sampling)."""
    reference: Literal["sft", "previous"] = "sft"
    """PPO's KL reference: the SFT model, or the rejection-sampling model PPO starts from."""
    num_envs: int = 16
    """Sub-environments of the environments built for each stage."""
    rejection: RejectionSamplingConfig = field(
        default_factory=lambda: RejectionSamplingConfig(progress=False)
    )
    """Rejection-sampling options (its ``rounds`` is replaced by ``rs_rounds``)."""
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(progress=False))
    """PPO options."""

    def __post_init__(self) -> None:
        if self.rs_rounds < 0 or self.ppo_updates < 0 or self.rs_rounds + self.ppo_updates == 0:
            raise ValueError("rs_rounds and ppo_updates must be >= 0 and not both 0")
        if self.reference not in ("sft", "previous"):
            raise ValueError(f"reference must be 'sft' or 'previous', got {self.reference!r}")


@dataclass
class IterativeResult:
    """Per-round rejection-sampling stats, per-update PPO stats and the final policy."""

    rejection_history: list[dict[str, float]]
    ppo_history: list[dict[str, float]]
    policy: nn.Module
    rejection_policy: nn.Module | None


def iterative_rlhf(
    sft_policy: nn.Module | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    prompts: Any,
    reward: Any,
    config: IterativeConfig | None = None,
    *,
    device: Any = None,
    **env_kwargs: Any,
) -> IterativeResult:
    """Run rejection-sampling rounds, then PPO from the result; ``env_kwargs`` go to every environment."""
    config = config or IterativeConfig()
    tokenizer = load_tokenizer(tokenizer if tokenizer is not None else sft_policy)
    device = resolve_device(
        device
        if device is not None or not isinstance(sft_policy, nn.Module)
        else next(sft_policy.parameters()).device
    )
    sft = load_causal_lm(sft_policy, device=device)
    frozen_sft = copy.deepcopy(sft).eval().requires_grad_(False)

    rejection_history: list[dict[str, float]] = []
    rs_model: nn.Module | None = None
    policy = copy.deepcopy(sft)
    if config.rs_rounds:
        rs_config = dataclasses.replace(config.rejection, rounds=config.rs_rounds)
        rs_agent = RejectionSamplingAgent(policy, tokenizer, rs_config, device=device)
        env = rs_agent.make_env(prompts, reward, num_envs=config.num_envs, reference=frozen_sft, **env_kwargs)
        rejection_history = rs_agent.train(env)
        policy = (
            rs_agent.policy.merge_and_unload()
            if hasattr(rs_agent.policy, "merge_and_unload")
            else rs_agent.policy
        )
        rs_model = copy.deepcopy(policy).eval().requires_grad_(False)

    ppo_history: list[dict[str, float]] = []
    if config.ppo_updates:
        if config.reference == "sft":
            reference: Any = frozen_sft
        else:
            reference = None if config.ppo.lora_rank else (rs_model or frozen_sft)
        ppo_agent = PPOAgent(policy, tokenizer, config.ppo, reference=reference, device=device)
        env = ppo_agent.make_env(prompts, reward, num_envs=config.num_envs, **env_kwargs)
        ppo_history = ppo_agent.train(env, config.ppo_updates)
        policy = ppo_agent.policy
    return IterativeResult(rejection_history, ppo_history, policy, rs_model)
