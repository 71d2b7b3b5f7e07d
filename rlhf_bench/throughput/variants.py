"""The registry of rollout variants: each name builds a :class:`Variant` whose ``run`` performs one rollout.

Adding a variant is one decorated builder::

    @rollout_variant("env-bf16", "the environment with a bf16 reference")
    def _env_bf16(setup: Setup) -> Variant:
        ...
        return Variant(run=lambda rep: ..., model_bytes=...)

Every rollout generates exactly ``batch_size * new_tokens`` tokens (``generate`` gets
``min_new_tokens=max_new_tokens``, the environments ``stop_token_ids=[]``), so the work is identical and the
ratios in :data:`RATIOS` compare like with like. A variant that computes a whole RLHF rollout also exposes
``rollout(repetition) -> Rollout`` (the tokens, their reference log-probabilities, the scores), which the
tests compare across variants. The peers (``trl-grpo``, ``torchrl``) need optional packages
(``requires``); :func:`unavailable` says why one cannot run here.
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
from rlhf_bench.throughput.baselines import Floor, Rollout, generate, monolithic, no_cache
from rlhf_bench.throughput.models import Setup
from rlhf_bench.throughput.peers import PEER_PACKAGES, missing_packages

__all__ = [
    "CUDA_ONLY",
    "LORA_VARIANTS",
    "MEASUREMENTS",
    "OPTIONAL",
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
    "unavailable",
]


@dataclass
class Variant:
    """A built variant: ``run(repetition)`` performs one rollout and returns the generated token count;
    ``rollout(repetition)``, where the variant computes a whole RLHF rollout, returns what it computed."""

    run: Callable[[int], int]
    model_bytes: int
    keep: list[Any] = field(default_factory=list)  # objects that must live as long as the variant
    rollout: Callable[[int], Rollout] | None = None


@dataclass(frozen=True)
class VariantSpec:
    """A registered rollout variant."""

    name: str
    build: Callable[[Setup], Variant]
    description: str
    cuda_only: bool = False
    lora: bool = False
    requires: tuple[str, ...] = ()  # optional packages (the peers)


ROLLOUTS: dict[str, VariantSpec] = {}
"""Rollout variants by name, in the order they are reported."""


def rollout_variant(
    name: str,
    description: str,
    *,
    cuda_only: bool = False,
    lora: bool = False,
    requires: tuple[str, ...] = (),
) -> Callable[[Callable[[Setup], Variant]], Callable[[Setup], Variant]]:
    """Decorator registering ``build(setup) -> Variant`` under ``name``."""

    def decorate(build: Callable[[Setup], Variant]) -> Callable[[Setup], Variant]:
        ROLLOUTS[name] = VariantSpec(name, build, description, cuda_only, lora, requires)
        return build

    return decorate


def unavailable(name: str) -> str | None:
    """Why variant ``name`` cannot run in this Python environment, or None when it can."""
    missing = missing_packages(name)
    if not missing:
        return None
    return f'{name} needs {", ".join(missing)}, not installed (pip install -e ".[peers]")'


def _from_rollout(rollout: Callable[[int], Rollout], bytes_: int, keep: list[Any] | None = None) -> Variant:
    return Variant(lambda rep: rollout(rep).tokens, bytes_, keep or [], rollout)


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
def _baseline(setup: Setup, rollout: Callable[[nn.Module, nn.Module, nn.Module], Rollout]) -> Variant:
    policy, reference, reward = setup.copy(setup.policy), setup.copy(setup.policy), setup.copy(setup.reward)

    def run(rep: int) -> Rollout:
        torch.manual_seed(setup.settings.seed + rep)
        return rollout(policy, reference, reward)

    return _from_rollout(run, model_bytes(policy, reference, reward))


# ---------------------------------------------------------------------------------------- the floor
def _floor_variant(setup: Setup, *, graphs: bool = False) -> Variant:
    policy, reference, reward = setup.copy(setup.policy), setup.copy(setup.policy), setup.copy(setup.reward)
    floor = Floor(setup, policy, reference, reward, cuda_graphs=graphs)
    generator = torch.Generator(device=setup.device)

    def rollout(rep: int) -> Rollout:
        return floor(generator.manual_seed(setup.settings.seed + rep))

    return _from_rollout(rollout, model_bytes(policy, reference, reward), [floor])


@rollout_variant("floor", "(f) the unavoidable work: per token one cached policy and one reference forward")
def _floor(setup: Setup) -> Variant:
    return _floor_variant(setup)


@rollout_variant("floor-graphs", "(f) with the decode steps replayed as CUDA graphs", cuda_only=True)
def _floor_graphs(setup: Setup) -> Variant:
    return _floor_variant(setup, graphs=True)


@rollout_variant("generate", "(a) the policy's Hugging Face generate alone (sampling, no log-probabilities)")
def _generate_variant(setup: Setup) -> Variant:
    policy = setup.copy(setup.policy)

    def run(rep: int) -> int:
        torch.manual_seed(setup.settings.seed + rep)
        with torch.no_grad():
            return int(generate(policy, setup)[0][:, setup.settings.prompt_length :].numel())

    return Variant(run, model_bytes(policy))


@rollout_variant("monolithic", "(b) TRL-style: generate + one reference forward + one reward forward")
def _monolithic_variant(setup: Setup) -> Variant:
    return _baseline(setup, lambda p, r, w: monolithic(setup, p, r, w, contextlib.nullcontext))


@rollout_variant("monolithic-greedy", "(b0) as (b) with greedy decoding: an upper bound of its speed")
def _monolithic_greedy_variant(setup: Setup) -> Variant:
    return _baseline(setup, lambda p, r, w: monolithic(setup, p, r, w, contextlib.nullcontext, sample=False))


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

    def rollout(rep: int) -> Rollout:
        return _env_outputs(env_rollout(env, agent, setup, seed=setup.settings.seed + rep), setup)

    return Variant(run, model_bytes(agent.policy, ref_model, reward), [agent, env], rollout)


def _env_outputs(trajectories: Trajectories, setup: Setup) -> Rollout:
    """The environment's episodes as a :class:`Rollout`. The reference log-probabilities are read back from
    its dense reward, ``-beta (logp - ref_logp)`` (the default k1 estimator) plus the score on the last token."""
    kl_reward = trajectories.rewards.clone()  # (B, N)
    scores = torch.as_tensor(trajectories.scores, dtype=kl_reward.dtype, device=kl_reward.device)
    kl_reward[:, -1] -= scores
    ref_logprobs = trajectories.logprobs + kl_reward / setup.settings.kl_coef
    prompt_ids = torch.stack([ids.to(kl_reward.device) for ids in trajectories.prompt_ids])
    return Rollout(prompt_ids, trajectories.response_ids, ref_logprobs, scores)


@rollout_variant("env", "(c) PPOAgent through TextGenVectorEnv: dense per-token KL reward in the env")
def _env(setup: Setup) -> Variant:
    return _env_variant(setup)


@rollout_variant(
    "monolithic-lora", "(b') as (b) with a LoRA policy and its adapter-disabled base as reference", lora=True
)
def _monolithic_lora(setup: Setup) -> Variant:
    policy = add_lora(setup.copy(setup.policy), rank=setup.settings.lora_rank).eval()
    reward = setup.copy(setup.reward)

    def rollout(rep: int) -> Rollout:
        torch.manual_seed(setup.settings.seed + rep)
        return monolithic(setup, policy, policy, reward, policy.disable_adapter)

    return _from_rollout(rollout, model_bytes(policy, reward))


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
    return _baseline(setup, lambda p, r, w: no_cache(setup, p, r, w))


# ---------------------------------------------------------------------------------------- the peers
def _peer_variant(setup: Setup, peer: Callable[..., Callable[[], Rollout]]) -> Variant:
    policy, reference, reward = setup.copy(setup.policy), setup.copy(setup.policy), setup.copy(setup.reward)
    built = peer(setup, policy, reference, reward)

    def rollout(rep: int) -> Rollout:
        torch.manual_seed(setup.settings.seed + rep)
        return built()

    return _from_rollout(rollout, model_bytes(policy, reference, reward), [built])


@rollout_variant(
    "trl-grpo",
    "TRL's GRPO rollout: generate, reference log-probs (fused LM head), reward model on the texts",
    requires=PEER_PACKAGES["trl-grpo"],
)
def _trl_grpo(setup: Setup) -> Variant:
    from rlhf_bench.throughput.peers import TRLGRPORollout

    return _peer_variant(setup, TRLGRPORollout)


@rollout_variant(
    "torchrl",
    "TorchRL's LLM rollout: ChatEnv, TransformersWrapper, KLRewardTransform, HFRewardModelWrapper",
    requires=PEER_PACKAGES["torchrl"],
)
def _torchrl(setup: Setup) -> Variant:
    from rlhf_bench.throughput.peers import TorchRLRollout

    return _peer_variant(setup, TorchRLRollout)


MEASUREMENTS = ("ppo-update", "lora-memory")
"""Measurements beside the rollouts: PPO update throughput and LoRA memory (both use LoRA)."""
VARIANTS = (*ROLLOUTS, *MEASUREMENTS)
CUDA_ONLY = tuple(name for name, spec in ROLLOUTS.items() if spec.cuda_only)
OPTIONAL = tuple(name for name, spec in ROLLOUTS.items() if spec.requires)
"""Variants that need optional packages: they run when named in ``--variants``, not by default."""
LORA_VARIANTS = (*(name for name, spec in ROLLOUTS.items() if spec.lora), *MEASUREMENTS)

RATIOS = (
    ("env", "floor", "c/f"),
    ("env-fused", "floor", "c_fused/f"),
    ("env-graphs", "floor-graphs", "c_graphs/f_graphs"),
    ("env-fused-graphs", "floor-graphs", "c_fused_graphs/f_graphs"),
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
    ("env", "trl-grpo", "c/trl_grpo"),
    ("env", "torchrl", "c/torchrl"),
    ("env-fused", "trl-grpo", "c_fused/trl_grpo"),
    ("env-fused", "torchrl", "c_fused/torchrl"),
)
"""(numerator, denominator, label) of the reported ratios; a ratio is reported when both variants ran."""
