"""The registry of rollout variants: each name builds a :class:`Variant` whose ``run`` performs one rollout.

Adding a variant is one decorated builder::

    @rollout_variant("env-bf16", "the environment with a bf16 reference")
    def _env_bf16(setup: Setup) -> Variant:
        ...
        return Variant(run=lambda rep: ..., model_bytes=...)

Every rollout generates exactly ``batch_size * new_tokens`` tokens (``generate`` gets
``min_new_tokens=max_new_tokens``, the environments ``stop_token_ids=[]``), so the work is identical and the
ratios in :data:`RATIOS` compare like with like.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from agents.policy import add_lora
from agents.ppo import PPOAgent, PPOConfig
from agents.rollout import Trajectories, collect_episodes
from llm_env import AdapterDisabled, TextGenVectorEnv
from llm_env.distributed import world_size
from rlhf_bench.throughput.baselines import generate, monolithic, no_cache
from rlhf_bench.throughput.models import Setup

__all__ = [
    "CUDA_ONLY",
    "LORA_VARIANTS",
    "MEASUREMENTS",
    "RATIOS",
    "ROLLOUTS",
    "VARIANTS",
    "Variant",
    "VariantSpec",
    "env_rollout",
    "make_env",
    "model_bytes",
    "ppo_agent",
    "rollout_variant",
]


@dataclass
class Variant:
    """A built variant: ``run(repetition)`` performs one rollout and returns the generated token count."""

    run: Callable[[int], int]
    model_bytes: int
    keep: list[Any] = field(default_factory=list)  # objects that must live as long as the variant


@dataclass(frozen=True)
class VariantSpec:
    """A registered rollout variant."""

    name: str
    build: Callable[[Setup], Variant]
    description: str
    cuda_only: bool = False
    lora: bool = False


ROLLOUTS: dict[str, VariantSpec] = {}
"""Rollout variants by name, in the order they are reported."""


def rollout_variant(
    name: str, description: str, *, cuda_only: bool = False, lora: bool = False
) -> Callable[[Callable[[Setup], Variant]], Callable[[Setup], Variant]]:
    """Decorator registering ``build(setup) -> Variant`` under ``name``."""

    def decorate(build: Callable[[Setup], Variant]) -> Callable[[Setup], Variant]:
        ROLLOUTS[name] = VariantSpec(name, build, description, cuda_only, lora)
        return build

    return decorate


def model_bytes(*models: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``models`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


# ------------------------------------------------------------------------------------- the baselines
def _baseline(setup: Setup, name: str, rollout: Callable[[nn.Module, nn.Module, nn.Module], int]) -> Variant:
    policy, reference, reward = setup.copy(setup.policy), setup.copy(setup.policy), setup.copy(setup.reward)

    def run(rep: int) -> int:
        torch.manual_seed(setup.settings.seed + rep)
        return rollout(policy, reference, reward)

    models = [policy] if name == "generate" else [policy, reference, reward]
    return Variant(run, model_bytes(*models))


@rollout_variant("generate", "(a) the policy's Hugging Face generate alone (sampling, no log-probabilities)")
def _generate_variant(setup: Setup) -> Variant:
    def rollout(policy: nn.Module, reference: nn.Module, reward: nn.Module) -> int:
        with torch.no_grad():
            return int(generate(policy, setup)[0][:, setup.settings.prompt_length :].numel())

    return _baseline(setup, "generate", rollout)


@rollout_variant("monolithic", "(b) TRL-style: generate + one reference forward + one reward forward")
def _monolithic_variant(setup: Setup) -> Variant:
    return _baseline(setup, "monolithic", lambda p, r, w: monolithic(setup, p, r, w, contextlib.nullcontext))


@rollout_variant("monolithic-greedy", "(b0) as (b) with greedy decoding: an upper bound of its speed")
def _monolithic_greedy_variant(setup: Setup) -> Variant:
    return _baseline(
        setup,
        "monolithic-greedy",
        lambda p, r, w: monolithic(setup, p, r, w, contextlib.nullcontext, sample=False),
    )


# ---------------------------------------------------------------------------------- the environment
def ppo_agent(
    setup: Setup, policy: nn.Module, *, lora: bool, reference: Any = None, cuda_graphs: bool = False
) -> PPOAgent:
    """The PPO agent every environment variant acts with (its sampler is the policy's KV-cached decode)."""
    s = setup.settings
    if not lora:  # a full fine-tune trains every weight (the templates are built frozen)
        policy.requires_grad_(True)
    config = PPOConfig(
        temperature=s.temperature,
        kl_coef=s.kl_coef,
        lora_rank=s.lora_rank if lora else 0,
        # batch_size episodes per process (and per minibatch at most 16): on N processes the update is
        # data-parallel over all ranks' episodes.
        episodes_per_update=s.batch_size * world_size(),
        minibatch_size=math.gcd(s.batch_size, 16) * world_size(),
        ppo_epochs=s.ppo_epochs,
        seed=s.seed,
        progress=False,
        cuda_graphs=cuda_graphs,
    )
    return PPOAgent(policy, setup.tokenizer, config, reference=reference, device=setup.device)


def make_env(setup: Setup, reference: Any, reward: Any, *, cuda_graphs: bool = False) -> TextGenVectorEnv:
    """The environment of the settings: no stop token, so every episode has exactly ``new_tokens`` tokens."""
    s = setup.settings
    return TextGenVectorEnv(
        num_envs=s.batch_size,
        prompts=setup.prompt_texts,
        tokenizer=setup.tokenizer,
        reward=reward,
        reward_tokenizer=setup.tokenizer,
        reward_batch_size=s.batch_size,
        reference=reference,
        kl_coef=s.kl_coef if reference is not None else 0.0,
        max_new_tokens=s.new_tokens,
        max_prompt_length=s.prompt_length,
        stop_token_ids=[],
        device=setup.device,
        cuda_graphs=cuda_graphs,
    )


def env_rollout(env: TextGenVectorEnv, agent: PPOAgent, setup: Setup, seed: int) -> Trajectories:
    """``batch_size`` episodes of ``agent`` in ``env``, checked to have generated exactly the expected tokens."""
    trajectories = collect_episodes(env, agent, setup.settings.batch_size, seed=seed)
    if int(trajectories.lengths.sum()) != setup.tokens:
        raise RuntimeError(
            f"the environment generated {int(trajectories.lengths.sum())} tokens, not {setup.tokens}"
        )
    return trajectories


def _env_variant(setup: Setup, *, lora: bool = False, fused: bool = False, graphs: bool = False) -> Variant:
    reward = setup.copy(setup.reward)
    agent = ppo_agent(setup, setup.copy(setup.policy), lora=lora, cuda_graphs=graphs)
    # Explicit, so env-lora stays unfused whatever PPOConfig.fuse_reference defaults to.
    reference = AdapterDisabled(agent.policy, fuse=fused) if lora else agent.reference
    env = make_env(setup, reference, reward, cuda_graphs=graphs)
    agent.sampler.attach(env)  # acts from the fused policy logits when the env computes them
    ref_model = agent.policy if lora else agent.reference

    def run(rep: int) -> int:
        return int(env_rollout(env, agent, setup, seed=setup.settings.seed + rep).lengths.sum())

    return Variant(run, model_bytes(agent.policy, ref_model, reward), keep=[agent, env])


@rollout_variant("env", "(c) PPOAgent through TextGenVectorEnv: dense per-token KL reward in the env")
def _env(setup: Setup) -> Variant:
    return _env_variant(setup)


@rollout_variant(
    "monolithic-lora", "(b') as (b) with a LoRA policy and its adapter-disabled base as reference", lora=True
)
def _monolithic_lora(setup: Setup) -> Variant:
    policy = add_lora(setup.copy(setup.policy), rank=setup.settings.lora_rank).eval()
    reward = setup.copy(setup.reward)

    def run(rep: int) -> int:
        torch.manual_seed(setup.settings.seed + rep)
        return monolithic(setup, policy, policy, reward, policy.disable_adapter)

    return Variant(run, model_bytes(policy, reward))


@rollout_variant(
    "env-lora", "(c') as (c) with a LoRA policy and AdapterDisabled(policy) as reference", lora=True
)
def _env_lora(setup: Setup) -> Variant:
    return _env_variant(setup, lora=True)


@rollout_variant(
    "env-fused", "(c'') as (c') with policy and reference decoded in one forward pass", lora=True
)
def _env_fused(setup: Setup) -> Variant:
    return _env_variant(setup, lora=True, fused=True)


@rollout_variant("env-graphs", "(c) with the decode steps replayed as CUDA graphs", cuda_only=True)
def _env_graphs(setup: Setup) -> Variant:
    return _env_variant(setup, graphs=True)


@rollout_variant(
    "env-fused-graphs", "(c'') with the fused decode step replayed as a CUDA graph", cuda_only=True, lora=True
)
def _env_fused_graphs(setup: Setup) -> Variant:
    return _env_variant(setup, lora=True, fused=True, graphs=True)


@rollout_variant("no-cache", "(d) RL4LMs-style: every step re-encodes the sequence with policy and reference")
def _no_cache_variant(setup: Setup) -> Variant:
    return _baseline(setup, "no-cache", lambda p, r, w: no_cache(setup, p, r, w))


MEASUREMENTS = ("ppo-update", "lora-memory")
"""Measurements beside the rollouts: PPO update throughput and LoRA memory (both use LoRA)."""
VARIANTS = (*ROLLOUTS, *MEASUREMENTS)
CUDA_ONLY = tuple(name for name, spec in ROLLOUTS.items() if spec.cuda_only)
LORA_VARIANTS = (*(name for name, spec in ROLLOUTS.items() if spec.lora), *MEASUREMENTS)

RATIOS = (
    ("env", "monolithic", "c/b"),
    ("env", "generate", "c/a"),
    ("env", "no-cache", "c/d"),
    ("env", "monolithic-greedy", "c/b_greedy"),
    ("env-lora", "monolithic-lora", "c_lora/b_lora"),
    ("env-fused", "monolithic-lora", "c_fused/b_lora"),
    ("env-fused", "monolithic", "c_fused/b"),
    ("env-fused", "generate", "c_fused/a"),
    ("env-fused", "monolithic-greedy", "c_fused/b_greedy"),
    ("env-fused", "no-cache", "c_fused/d"),
    ("env-graphs", "monolithic", "c_graphs/b"),
    ("env-graphs", "no-cache", "c_graphs/d"),
    ("env-fused-graphs", "monolithic-lora", "c_fused_graphs/b_lora"),
    ("env-fused-graphs", "monolithic", "c_fused_graphs/b"),
)
"""(numerator, denominator, label) of the reported ratios; a ratio is reported when both variants ran."""
