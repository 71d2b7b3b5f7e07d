"""The critic-free policy-gradient core shared by GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++ and ReMax.

These algorithms do the same four things and differ only in two pure functions, the advantage and the loss,
which each algorithm's module defines (``agents/grpo.py``, ``agents/rloo.py``, ...):

1. **Rollout** (:meth:`PGAgent.rollout`): choose ``prompts_per_update`` prompts and force each one
   ``group_size`` times into an environment with ``AutoresetMode.DISABLED`` (:func:`agents.collect_episodes`
   with ``prompt_indices``): episode ``i * G + j`` is response ``j`` to prompt ``i``. The collector counts
   every episode it starts, so long responses are never dropped in favour of short ones.
2. **Rewards** (:meth:`PGAgent.sequence_rewards`): the reward of a response is the environment's return,
   the reward-model score minus the summed per-token KL penalty when the KL is in the reward.
3. **Advantages** (the algorithm's ``advantages``): group mean and std (GRPO), leave-one-out (RLOO), the
   greedy response's reward (ReMax), per-token returns normalised over the batch (REINFORCE++), ...
4. **Loss** (the algorithm's ``policy_loss``): the clipped surrogate on the recomputed log-probabilities,
   per token or per sequence (GSPO), aggregated over tokens and responses in the algorithm's way
   (:func:`agents.losses.aggregate_loss`), plus ``kl_coef`` times the KL to the reference when the KL is in
   the loss; ``epochs`` passes of minibatches, like PPO without a critic.

**Where the KL goes** (``kl_in``) is the user's choice for every algorithm (TRL issues 4967 and 6503,
OpenRLHF 1309): ``"reward"`` (the default) lets the environment pay ``-kl_coef * k(logp - ref_logp)`` per
token, so the KL enters the rewards and hence the advantages; ``"loss"`` sets the environment's ``kl_coef``
to 0 and adds ``kl_coef * k(logp - ref_logp)``, with ``k`` one of :data:`llm_env.KL_ESTIMATORS`, to the loss
(DeepSeekMath's placement, Shao et al. 2024). The estimator's *gradient* is what matters, and it depends on
the placement (:mod:`llm_env.kl`; Tang & Munos 2025): as a reward only k1 gives ``grad KL(pi || pi_ref)``
(score function), in the loss only k2 does (pathwise; k1's is zero in expectation, k3's is the gradient of
``KL(pi_ref || pi)``). So ``kl_estimator=None``, the default, means k1 in the reward and k2 in the loss, and
an explicit biased combination (e.g. GRPO's k3 in the loss) runs with a
:class:`~llm_env.kl.KLGradientBiasWarning`. The reference is the environment's (untempered), so both
placements penalise the same KL.

**On N processes** (``torchrun --nproc-per-node N``, see :mod:`llm_env.distributed`) every rank owns a
disjoint, seeded shard of the prompts (:meth:`PGAgent.make_env`) and samples ``prompts_per_update / N`` whole
groups per update with its own seeds, so a group never straddles ranks and the group statistics (GRPO's mean
and std, RLOO's leave-one-out, ReMax's greedy baseline) stay local and exact. What defines the update is
global: the normalisers of every loss aggregation (the minibatch's sequences and tokens over all ranks, Dr.
GRPO's constant), REINFORCE++'s batch whitening, DAPO's count of informative groups, the token budget and the
logged statistics; the minibatches are dealt by one permutation of every rank's episodes, numbered in rank order
(:func:`llm_env.distributed.deal_minibatches`), and DDP averages the gradients (or FSDP2 reduce-scatters them),
so an update on N ranks is the single-process update on the same episodes, minibatch for minibatch. Rank 0
writes logs, TensorBoard and checkpoints.

Reading order: :class:`PGConfig` (the shared knobs), :meth:`PGAgent.rollout`, :meth:`PGAgent.learn` (the
update), :meth:`PGAgent.train` (the loop); the pure helpers :func:`group_view` and :func:`clip_loss` are what
the algorithm modules build their advantages and losses from.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.checkpoint import load_training_state, save_training_state
from agents.losses import LOSS_AGGREGATIONS, aggregate_loss, clipped_surrogate, masked_mean
from agents.options import OnPolicyOptions
from agents.policy import SequenceBatch, TokenSampler, add_lora, load_policy, response_forward, save_policy
from agents.rollout import Trajectories, collect_episodes
from agents.tracking import append_stat, jsonable, tensorboard_writer
from llm_env import KL_ESTIMATORS, AdapterDisabled, TextGenVectorEnv, TokenActions, kl_penalty
from llm_env.distributed import (
    all_counts,
    all_reduce_means,
    all_reduce_sum,
    all_reduce_sums,
    check_divisible,
    data_parallel,
    deal_minibatches,
    full_parameters,
    gradient_sync,
    init_distributed,
    is_main_process,
    rank_seed,
    shard_prompts,
    stand_in,
    world_size,
)
from llm_env.kl import UNBIASED_KL_ESTIMATOR, check_kl_coef, check_kl_estimator, warn_kl_gradient_bias
from llm_env.models import load_causal_lm, pad_token_id
from llm_env.training import make_optimizer, make_scheduler, trainable_parameters

__all__ = ["PGAgent", "PGConfig", "check_group_size", "clip_loss", "group_view", "per_token"]


# --------------------------------------------------------------------------------------- pure helpers
def group_view(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) -> (N / G, G): the responses of each prompt on one row (episode ``i * G + j`` is row i)."""
    if values.dim() != 1 or group_size < 1 or values.shape[0] % group_size:
        raise ValueError(
            f"need a 1-D tensor of whole groups of {group_size} responses, got shape {tuple(values.shape)}"
        )
    return values.view(-1, group_size)


def check_group_size(group_size: int, algorithm: str) -> None:
    """Raise unless ``group_size >= 2``. An advantage that compares a response with the other responses to its
    prompt is undefined for a group of one: GRPO's Bessel-corrected std and RLOO's leave-one-out mean divide by
    ``G - 1 = 0`` (NaN advantages, then NaN weights), and Dr. GRPO's ``R_i - mean`` is 0 (no signal)."""
    if group_size < 2:
        raise ValueError(
            f"{algorithm} compares responses to the same prompt: group_size must be >= 2, got {group_size} "
            "(a group of one has no other response to compare with); sample at least 2 responses per prompt, "
            "or use ReMax or REINFORCE++, whose baselines need no group"
        )


def per_token(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per response (N,) repeated on each of its tokens (N, T); per-token ones are masked."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(-1, mask.shape[1])
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages of shape {tuple(advantages.shape)} for tokens {tuple(mask.shape)}")
    return advantages * mask.to(advantages.dtype)


def clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    *,
    clip_low: float,
    clip_high: float | None = None,
    num_sequences: int | None = None,
    num_tokens: Any = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-level clipped surrogate (:func:`agents.losses.clipped_surrogate`) reduced by ``aggregation``
    (:func:`agents.losses.aggregate_loss`), with the diagnostics every agent logs: clip fraction, ratio and
    ``approx_kl = E[(r - 1) - log r]`` (http://joschu.net/blog/kl-approx.html). With one epoch and one
    minibatch the ratio is 1 and the gradient is REINFORCE's, ``-A grad log pi`` per token."""
    loss_t, ratio, clipped = clipped_surrogate(
        logprobs, old_logprobs, advantages, clip_low=clip_low, clip_high=clip_high
    )
    loss = aggregate_loss(
        loss_t, mask, aggregation, num_sequences=num_sequences, num_tokens=num_tokens, max_length=max_length
    )
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(ratio - 1.0 - (logprobs - old_logprobs), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------- config
@dataclass
class PGConfig(OnPolicyOptions):
    """The knobs every critic-free agent shares; each algorithm's config subclasses it with its defaults. The
    optimizer, LoRA, strategy, seed and logging fields come from :class:`~agents.options.OnPolicyOptions`."""

    learning_rate: float = 1e-6
    """AdamW learning rate (TRL's GRPO and RLOO trainers: 1e-6; tiny models need ~1e-3)."""
    prompts_per_update: int = 8
    """Prompts per rollout; the rollout has ``prompts_per_update * group_size`` episodes."""
    group_size: int = 8
    """Responses sampled per prompt, G (TRL's GRPO ``num_generations``: 8)."""
    temperature: float = 1.0
    """Sampling temperature of the behaviour policy (also used when recomputing log-probabilities)."""
    epochs: int = 1
    """Passes over each rollout (GRPO's mu; TRL's ``num_iterations``: 1). More than one, or several
    minibatches, makes the later steps off-policy, where the clip matters."""
    minibatch_size: int | None = None
    """Episodes per optimizer step (None: the whole rollout, one step per epoch)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch; their losses add up exactly to the minibatch loss."""
    clip_range: float = 0.2
    """Lower clip epsilon of the ratio (PPO's 0.2)."""
    clip_range_high: float | None = None
    """Upper clip epsilon (None: ``clip_range``; DAPO's clip-higher: 0.28)."""
    kl_coef: float = 0.04
    """beta of the KL to the reference (GRPO: 0.04)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL is paid: ``"reward"`` (the environment's per-token penalty, our default) or ``"loss"``
    (environment ``kl_coef=0``; the agent adds ``kl_coef * k(logp - ref_logp)`` to its loss)."""
    kl_estimator: str | None = field(default=None, metadata={"choices": KL_ESTIMATORS})
    """The KL estimator k: of the environment's penalty (``make_env`` passes it; ``train`` checks the
    environment uses it) or of the loss term. A name in :data:`llm_env.KL_ESTIMATORS`, or None (``none`` on
    the command line) for the one whose gradient is that of KL(pi || pi_ref) where ``kl_in`` pays it: k1 in
    the reward, k2 in the loss (:data:`llm_env.kl.UNBIASED_KL_ESTIMATOR`; set to that name at construction).
    Another choice with ``kl_coef > 0`` warns that its gradient is biased (k3 in the reward or the loss, k2
    in the reward, k1 in the loss; :mod:`llm_env.kl`)."""

    @property
    def episodes_per_update(self) -> int:
        """Episodes per rollout: ``prompts_per_update * group_size``."""
        return self.prompts_per_update * self.group_size

    def __post_init__(self) -> None:
        super().__post_init__()

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.prompts_per_update >= 1, f"prompts_per_update must be >= 1, got {self.prompts_per_update}")
        check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        n = self.episodes_per_update
        check(
            self.minibatch_size is None or (self.minibatch_size >= 1 and n % self.minibatch_size == 0),
            f"minibatch_size ({self.minibatch_size}) must divide the episodes per update "
            f"(prompts_per_update * group_size = {n}); pick e.g. {max(1, n // 4)} or None",
        )
        minibatch = self.minibatch_size or n
        check(
            self.gradient_accumulation_steps >= 1 and minibatch % self.gradient_accumulation_steps == 0,
            f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide the minibatch "
            f"({minibatch} episodes)",
        )
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0 < self.clip_range < 1, f"clip_range must be in (0, 1), got {self.clip_range}")
        check(
            self.clip_range_high is None or self.clip_range_high > 0,
            f"clip_range_high must be > 0 or None, got {self.clip_range_high}",
        )
        check_kl_coef(self.kl_coef)
        check(self.kl_in in ("reward", "loss"), f"kl_in must be 'reward' or 'loss', got {self.kl_in!r}")
        if self.kl_estimator is None:  # the estimator with an unbiased KL gradient where it is paid
            self.kl_estimator = UNBIASED_KL_ESTIMATOR[self.kl_in]
        check_kl_estimator(self.kl_estimator)
        if self.kl_coef > 0:  # a KL that is not paid has no gradient to get wrong
            warn_kl_gradient_bias(self.kl_estimator, self.kl_in)

    def check_world_size(self, world: int) -> None:
        """Fail before any work when ``world`` processes cannot split the rollout and the minibatches evenly:
        every rank samples ``prompts_per_update / world`` whole groups and holds ``minibatch_size / world``
        episodes of every minibatch."""
        check_divisible(
            "prompts_per_update",
            self.prompts_per_update,
            world,
            f"every rank samples prompts_per_update / {world} whole groups of group_size={self.group_size} "
            f"responses; pick a multiple of {world}",
        )
        if self.minibatch_size is not None:
            check_divisible(
                "minibatch_size",
                self.minibatch_size,
                world,
                f"every rank takes minibatch_size / {world} episodes of each minibatch; pick a multiple of {world}",
            )
        local = (self.minibatch_size or self.episodes_per_update) // world
        if local % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide the per-rank "
                f"minibatch {self.minibatch_size or self.episodes_per_update} / world size {world} = {local}"
            )

    def require_groups(self, algorithm: str) -> None:
        """Raise unless ``group_size >= 2`` (for advantages that compare responses to the same prompt; see
        :func:`check_group_size`)."""
        check_group_size(self.group_size, algorithm)


# ----------------------------------------------------------------------------------------------- agent
class PGAgent:
    """A critic-free policy-gradient agent on a transformers causal LM; subclasses define the algorithm.

    A subclass sets :attr:`config_class` and :attr:`algorithm`, and implements :meth:`advantages` and
    :meth:`policy_loss`; :attr:`kl_aggregation` says how the KL-in-loss term is averaged (like its policy
    loss). Everything else, rollout, recomputed log-probabilities, minibatch epochs, KL in the reward or
    the loss, LoRA, checkpoints, TensorBoard, the token budget, is shared here.

    Args:
        policy: the SFT model to optimise (a causal LM object, or a path / hub name).
        tokenizer: its tokenizer (default: loaded from ``policy`` when that is a path).
        config: the algorithm's config (default: its defaults).
        reference: the frozen reference; default: the policy's base with LoRA adapters disabled when
            ``lora_rank > 0``, otherwise a frozen copy of the initial policy. A path or model may be given.
        device: where the policy lives (default: the model's device, or CUDA when available for paths).

    Under ``torchrun`` the constructor starts the process group (:func:`llm_env.distributed.init_distributed`)
    and checks that the world size divides the rollout (a ValueError naming the numbers otherwise); the
    update trains through :func:`~llm_env.distributed.data_parallel` (``config.strategy``) while the policy
    itself acts.
    """

    config_class: ClassVar[type[PGConfig]] = PGConfig
    algorithm: ClassVar[str] = "pg"
    kl_aggregation: ClassVar[str] = "seq-mean-token-mean"

    def __init__(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: PGConfig | None = None,
        *,
        reference: nn.Module | str | os.PathLike | AdapterDisabled | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        config = config if config is not None else self.config_class()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        if self.kl_aggregation not in LOSS_AGGREGATIONS:  # a subclass typo would only show in the loss
            raise ValueError(f"kl_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.kl_aggregation}")
        self.config = config
        init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
        self.world_size = world_size()
        config.check_world_size(self.world_size)
        model, self.tokenizer, device = load_policy(policy, tokenizer, device)
        if isinstance(reference, (str, os.PathLike)):
            reference = load_causal_lm(reference, device=device).requires_grad_(False)
        if isinstance(reference, nn.Module):
            reference.eval()  # no dropout: the KL-in-loss term must see the reference the environment sees
        if config.lora_rank:  # peft freezes the base weights; only the adapters train
            model = add_lora(
                model,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
            )
            self._reference: Any = (
                AdapterDisabled(model, fuse=config.fuse_reference) if reference is None else reference
            )
        else:
            self._reference = (
                reference if reference is not None else copy.deepcopy(model).eval().requires_grad_(False)
            )
        self.policy = model
        self.device = device
        # What the update calls: DDP around the policy, or the policy sharded in place (FSDP2); the policy
        # itself acts (a DDP replica, or the full FSDP weights gathered around each rollout).
        self._trainer = data_parallel(self.policy, strategy=config.strategy)
        self.optimizer = make_optimizer(
            trainable_parameters(self.policy),
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = make_scheduler(self.optimizer, "constant", total_steps=1)
        self.update = 0
        self.sampled_tokens = 0
        """Response tokens generated by the rollouts so far, every one counted (the token budget)."""
        self.optimizer_steps = 0
        """Optimizer (gradient) steps taken so far, over all updates."""
        self.pad_id = pad_token_id(self.tokenizer)
        self._generator = torch.Generator(device=device).manual_seed(config.seed)
        self.sampler = TokenSampler(
            self.policy,
            temperature=config.temperature,
            generator=self._generator,
            cuda_graph=config.cuda_graphs,
        )
        """The acting half: samples with the policy's KV cache or from an environment's fused logits."""

    # ------------------------------------------------------------------------------------- wiring
    @property
    def reference(self) -> Any:
        """What to pass as the environment's ``reference`` (and what the KL-in-loss term compares to)."""
        return self._reference

    def env_kl_coef(self) -> float:
        """The environment's beta: ``kl_coef`` with the KL in the reward, 0 with the KL in the loss."""
        return self.config.kl_coef if self.config.kl_in == "reward" else 0.0

    def make_env(
        self, prompts: Any, reward: Any, *, num_envs: int = 16, **env_kwargs: Any
    ) -> TextGenVectorEnv:
        """A :class:`~llm_env.TextGenVectorEnv` for this agent: ``AutoresetMode.DISABLED`` (prompts are forced),
        its tokenizer, reference, device, beta (0 with the KL in the loss) and KL estimator. On N processes
        each rank's environment gets its own disjoint, seeded shard of ``prompts``
        (:func:`llm_env.distributed.shard_prompts`; too few prompts for N ranks x ``num_envs`` fail here)."""
        prompts = shard_prompts(
            prompts, num_envs=num_envs, seed=self.config.seed, key=env_kwargs.get("prompt_key", "prompt")
        )
        options = dict(
            prompts=prompts,
            reward=reward,
            tokenizer=self.tokenizer,
            reference=self.reference,
            kl_coef=self.env_kl_coef(),
            kl_estimator=self.config.kl_estimator,
            device=self.device,
            autoreset_mode=AutoresetMode.DISABLED,
        )
        if self.config.cuda_graphs:
            options["cuda_graphs"] = True
        options.update(env_kwargs)
        env = TextGenVectorEnv(num_envs=num_envs, **options)
        self.attach(env)
        return env

    def attach(self, env: TextGenVectorEnv) -> None:
        """Act from ``env``'s fused policy logits when it has them (see :meth:`TokenSampler.attach`)."""
        self.sampler.attach(env)

    def check_env(self, env: TextGenVectorEnv) -> None:
        """Raise unless ``env`` can run this agent: forced prompts, and the KL paid as configured."""
        if env.metadata["autoreset_mode"] != AutoresetMode.DISABLED:
            raise ValueError(
                f"{self.algorithm} forces each prompt group_size times: build the environment with "
                "autoreset_mode=AutoresetMode.DISABLED (agent.make_env does)"
            )
        if self.config.kl_in == "reward" and env.config.kl_estimator != self.config.kl_estimator:
            raise ValueError(
                f"the environment pays the KL with {env.config.kl_estimator!r} but the config says "
                f"kl_estimator={self.config.kl_estimator!r}: build the environment with agent.make_env or "
                "set the same estimator on both"
            )

    # -------------------------------------------------------------------------------------- acting
    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Sample the next tokens with the policy's KV cache; report their log-probabilities."""
        return self.sampler.act(obs, restarted)

    def choose_prompts(self, num_prompts: int, round_: int = 0) -> np.ndarray:
        """This rank's prompts of this update's rollout (round ``round_``): ``prompts_per_update / N`` of the
        ``num_prompts`` of its environment, a pure function of (seed, rank, update, round), without
        replacement unless there are fewer prompts than that."""
        count = self.config.prompts_per_update // self.world_size
        rng = np.random.default_rng((rank_seed(self.config.seed), self.update, round_))
        return rng.choice(num_prompts, size=count, replace=count > num_prompts)

    def sample(self, env: TextGenVectorEnv, prompts: np.ndarray) -> Trajectories:
        """``group_size`` responses to each prompt; episode ``i * G + j`` is response ``j`` to ``prompts[i]``."""
        queue = np.repeat(np.asarray(prompts, dtype=np.int64), self.config.group_size)
        self.policy.eval()  # sample without dropout, as the log-probabilities are recomputed
        return collect_episodes(
            env, self, len(queue), seed=rank_seed(self.config.seed + self.update), prompt_indices=queue
        )

    def rollout(self, env: TextGenVectorEnv) -> Trajectories:
        """The episodes of one update (this rank's share on N processes). ``extras["sampled_tokens"]`` counts
        every response token generated for them (subclasses that sample more, e.g. ReMax's greedy baseline,
        add theirs). With FSDP2 call it inside ``with llm_env.distributed.full_parameters(agent.policy):``
        on every rank (:meth:`train` does)."""
        trajectories = self.sample(env, self.choose_prompts(env.num_prompts))
        trajectories.extras["sampled_tokens"] = trajectories.num_tokens
        return trajectories

    # ------------------------------------------------------------------------------------ learning
    def sequence_rewards(self, trajectories: Trajectories) -> torch.Tensor:
        """R_i (N,): the environment's return, the score minus the summed KL penalty when it is in the reward."""
        return torch.as_tensor(trajectories.returns, dtype=torch.float32, device=self.device)

    def advantages(self, trajectories: Trajectories) -> torch.Tensor:
        """The algorithm's advantages: one per response (N,) or one per response token (N, T)."""
        raise NotImplementedError(f"{type(self).__name__} must define advantages()")

    def policy_loss(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        **totals: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The algorithm's loss on (N, T) tensors; ``totals`` (num_sequences, num_tokens, max_length) are
        those of the whole minibatch. Returns the loss and diagnostics."""
        raise NotImplementedError(f"{type(self).__name__} must define policy_loss()")

    def length_normaliser(self, trajectories: Trajectories) -> int | None:
        """``max_length`` for the losses that divide by a constant length: the environment's budget."""
        return trajectories.extras.get("max_new_tokens")

    def _reference_logprobs(self, batch: SequenceBatch) -> torch.Tensor:
        """log pi_ref of every response token, at temperature 1 like the environment's reference."""
        reference = self._reference
        if isinstance(reference, AdapterDisabled):
            with reference.model.disable_adapter():
                return response_forward(reference.model, batch).logprobs
        return response_forward(reference, batch).logprobs

    def check_groups(self, trajectories: Trajectories) -> None:
        """Raise unless the episodes come as whole groups of ``group_size`` responses to one prompt."""
        size = self.config.group_size
        index = trajectories.prompt_index
        if len(index) % size or (size > 1 and np.any(index.reshape(-1, size) != index[::size, None])):
            raise ValueError(
                f"{self.algorithm} needs episodes in groups of group_size={size} responses to the same prompt "
                f"(episode i * G + j answers prompt i), got {len(index)} episodes for prompts "
                f"{index[: 2 * size].tolist()}...; collect them with agent.rollout(env)"
            )

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        """One update on a rollout (from :meth:`rollout`); returns the diagnostics (means over steps).

        On N processes every rank calls it with its own episodes (whole groups); the update is the one a single
        process would make on all of them in rank order: the minibatches are dealt by one permutation of every
        rank's episodes (:func:`~llm_env.distributed.deal_minibatches`), each minibatch's normalisers
        (sequences, tokens) are counted over every rank, the loss is scaled by N because DDP averages the ranks'
        gradients, and the statistics are global. Ranks may hold different numbers of episodes (DAPO keeps what
        it finds) and of each minibatch: every rank runs as many forward and backward passes (collectives), on
        rows that carry no loss where it has fewer. ``extras["padding"]`` marks a rank whose episodes are all
        such rows (DAPO on a rank that found no informative group while others did).
        """
        config = self.config
        world = self.world_size
        start_time = time.perf_counter()
        self.check_groups(trajectories)
        n = len(trajectories)
        real = 0 if trajectories.extras.get("padding", False) else n
        counts = all_counts(real, self.device)  # every rank's episodes that carry loss (one collective)
        # Every rank scores as many rows (FSDP2's forward passes are collectives): a smaller share is padded
        # with copies of its first row, which carry no loss, and a rank without episodes keeps one row.
        rows = max(*counts, 1)
        batch = trajectories.sequences(pad_id=self.pad_id, device=self.device)
        valid = torch.arange(rows, device=self.device) < real  # (rows,) the episodes that carry loss
        keep = torch.arange(rows)
        keep[keep >= n] = 0
        if rows != n:
            batch = batch.select(keep)
        mask = batch.response_mask & valid[:, None]  # (rows, T)
        minibatch = min((config.minibatch_size // world) if config.minibatch_size else rows, rows)
        micro = max(1, minibatch // config.gradient_accumulation_steps)
        kl_in_loss = config.kl_in == "loss" and config.kl_coef > 0

        # The behaviour log-probabilities recomputed in one teacher-forced pass (ratio exactly 1 at first).
        self.policy.eval()  # no dropout, as PPO
        old_logprobs = torch.zeros(mask.shape, device=self.device)
        entropy = torch.zeros(mask.shape, device=self.device)
        ref_logprobs = torch.zeros(mask.shape, device=self.device) if kl_in_loss else None
        with torch.no_grad():
            for start in range(0, rows, minibatch):
                index = torch.arange(start, min(rows, start + minibatch), device=self.device)
                sub = batch.select(index)
                steps = sub.response_mask.shape[1]
                scores = response_forward(self._trainer, sub, temperature=config.temperature, entropy=True)
                old_logprobs[index, :steps] = scores.logprobs
                entropy[index, :steps] = scores.entropy
                if ref_logprobs is not None:
                    ref_logprobs[index, :steps] = self._reference_logprobs(sub)
        advantages = self.advantages(trajectories).to(self.device, torch.float32)  # (n,) or (n, T)
        if rows != n:
            advantages = advantages[keep.to(self.device)]  # (rows,) or (rows, T); padding is masked next
        advantages = per_token(advantages, mask)
        max_length = self.length_normaliser(trajectories)

        # The minibatches of every epoch, dealt by one permutation of every rank's episodes (the same generator
        # on every rank: minibatch k is the single-process one; each rank holds its episodes of it), and each
        # one's tokens over all ranks (one collective): with these totals and the minibatch's sequence count the
        # ranks' losses add up to the loss of the whole minibatch, however its episodes are spread.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.update)
        minibatches = deal_minibatches(
            counts, config.minibatch_size, epochs=config.epochs, generator=generator, device=self.device
        )
        tokens = all_reduce_sum(
            torch.stack([mask[m.rows].sum() for m in minibatches]).to(torch.float64)
        ).tolist()
        stats: dict[str, list[float]] = {}  # per optimizer step: as many on every rank
        micro_stats: dict[str, list[float]] = {}  # per micro-batch holding episodes of this rank
        for dealt, step_tokens in zip(minibatches, tokens):
            # (A minibatch without episodes, when no rank has any, has no sequence: its loss is 0, not 0 / 0.)
            step_totals = {
                "num_sequences": max(dealt.size, 1),
                "num_tokens": step_tokens,
                "max_length": max_length,
            }
            self.optimizer.zero_grad(set_to_none=True)
            step_loss = step_kl = 0.0
            # As many micro-batches on every rank (each backward pass is a collective).
            micro_batches = dealt.micro_batches(micro)
            for i, index in enumerate(micro_batches):
                # A rank left without episodes of this minibatch runs a pass on a row that carries no loss.
                index, placeholder = stand_in(index)
                sub = batch.select(index)
                steps = sub.response_mask.shape[1]
                sub_mask = torch.zeros_like(mask[index, :steps]) if placeholder else mask[index, :steps]
                with gradient_sync(self._trainer, i == len(micro_batches) - 1):
                    new = response_forward(self._trainer, sub, temperature=config.temperature)
                    loss, loss_stats = self.policy_loss(
                        new.logprobs,
                        old_logprobs[index, :steps],
                        advantages[index, :steps],
                        sub_mask,
                        **step_totals,
                    )
                    step_loss += float(loss.detach())
                    if ref_logprobs is not None:
                        kl_t = kl_penalty(new.logprobs, ref_logprobs[index, :steps], config.kl_estimator)
                        kl_loss = aggregate_loss(kl_t, sub_mask, self.kl_aggregation, **step_totals)
                        loss = loss + config.kl_coef * kl_loss
                        step_kl += float(kl_loss.detach())
                    # DDP (and FSDP2) average the ranks' gradients; this rank's share of the sum is N x its own.
                    (loss * world).backward()
                for key, value in loss_stats.items():  # (a placeholder's keys, without its value)
                    micro_stats.setdefault(key, [])
                    if not placeholder:
                        append_stat(micro_stats, key, value)
            # Each rank holds its share of the minibatch loss: N x the share, averaged over ranks, is the sum.
            append_stat(stats, "policy_loss", step_loss * world)
            if ref_logprobs is not None:
                append_stat(stats, "kl_loss", step_kl * world)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable_parameters(self.policy), config.max_grad_norm
            )
            append_stat(stats, "grad_norm", grad_norm)
            self.optimizer.step()
            self.optimizer_steps += 1
        self.scheduler.step()
        self.update += 1
        out = all_reduce_means({key: float(np.mean(values)) for key, values in stats.items()}, self.device)
        # The micro-batch diagnostics (clip fraction, ratio, ...) averaged over every rank's micro-batches that
        # hold episodes: a rank may have none (padding), and ranks hold different numbers of them.
        sums = all_reduce_sums(
            {
                **{f"sum/{key}": float(np.sum(values)) for key, values in micro_stats.items()},
                **{f"count/{key}": len(values) for key, values in micro_stats.items()},
            },
            self.device,
        )
        out.update({key: sums[f"sum/{key}"] / max(sums[f"count/{key}"], 1.0) for key in micro_stats})
        out.update(self._episode_stats(trajectories, real, mask, entropy, advantages))
        out.update(
            update_tokens_per_s=out.pop("tokens")
            * config.epochs
            / max(time.perf_counter() - start_time, 1e-9),
            learning_rate=float(self.scheduler.get_last_lr()[0]),
        )
        return out

    def _episode_stats(
        self,
        trajectories: Trajectories,
        real: int,
        mask: torch.Tensor,
        entropy: torch.Tensor,
        advantages: torch.Tensor,
    ) -> dict[str, float]:
        """Score, KL, reward and length per episode, entropy and advantage moments per token, over the
        episodes of every rank that carry loss (one collective)."""
        maskf = mask.to(torch.float32)
        kl = trajectories.kl[:real][np.isfinite(trajectories.kl[:real])]
        sums = all_reduce_sums(
            {
                "score": float(trajectories.scores[:real].sum()),
                "episodes": real,
                "kl": float(kl.sum()),
                "kl_count": len(kl),
                "reward": float(self.sequence_rewards(trajectories)[:real].sum()) if real else 0.0,
                "length": float(trajectories.lengths[:real].sum()),
                "tokens": float(maskf.sum()),
                "entropy": float((entropy * maskf).sum()),
                "advantage": float((advantages * maskf).sum()),
                "advantage_sq": float((advantages**2 * maskf).sum()),
            },
            self.device,
        )
        episodes, tokens = max(sums["episodes"], 1.0), max(sums["tokens"], 1.0)
        return {
            "score": sums["score"] / episodes,
            "kl": sums["kl"] / sums["kl_count"] if sums["kl_count"] else float("nan"),
            "reward": sums["reward"] / episodes,
            "response_length": sums["length"] / episodes,
            "entropy": sums["entropy"] / tokens,
            "advantage_mean": sums["advantage"] / tokens,
            "advantage_std": float(np.sqrt(sums["advantage_sq"] / tokens)),
            "tokens": sums["tokens"],
        }

    # ------------------------------------------------------------------------------------- the loop
    def train(
        self,
        env: TextGenVectorEnv,
        total_updates: int | None = None,
        *,
        total_tokens: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Update until ``total_updates`` updates are done, or, with ``total_tokens``, until the rollouts have
        sampled that many response tokens (the update that reaches the budget is the last), whichever comes
        first; continues from ``self.update`` after a resume.

        Each update seeds its prompt choice, sampling and minibatch order from ``(seed, update)``, so a run
        resumed from a checkpoint continues exactly as the uninterrupted run. Returns the per-update
        diagnostics (score, kl, reward, advantage statistics, policy and KL losses, clipfrac, approx_kl,
        entropy, grad_norm, sampled_tokens, throughput).

        On N processes every rank calls it with its own environment (:meth:`make_env` shards the prompts) and
        samples its share of every update with its own seeds (:func:`llm_env.distributed.rank_seed`); the
        token budget counts every rank's tokens, so all ranks stop after the same update, every rank returns
        the same global statistics, and only rank 0 writes TensorBoard logs, the progress bar and the
        checkpoint files.
        """
        config = self.config
        if total_updates is None and total_tokens is None:
            raise ValueError("pass total_updates, total_tokens (a budget of sampled response tokens) or both")
        if total_updates is None and config.lr_schedule != "constant":
            raise ValueError(
                f"lr_schedule={config.lr_schedule!r} decays over total_updates: pass total_updates (a token "
                "budget alone does not say how many updates there will be)"
            )
        self.check_env(env)
        self.attach(env)
        env.kl_coef = self.env_kl_coef()
        self.scheduler = make_scheduler(
            self.optimizer,
            config.lr_schedule,
            total_steps=total_updates or 1,
            warmup_steps=config.warmup_updates,
            completed_steps=self.update,
        )
        main = is_main_process()
        writer = tensorboard_writer(config.log_dir) if main else None
        history = []
        by_tokens = total_updates is None
        bar = tqdm(
            total=total_tokens if by_tokens else total_updates,
            initial=self.sampled_tokens if by_tokens else self.update,
            desc=self.algorithm,
            unit="tok" if by_tokens else "it",
            disable=not config.progress or not main,
        )
        while (total_updates is None or self.update < total_updates) and (
            total_tokens is None or self.sampled_tokens < total_tokens
        ):
            self._generator.manual_seed(rank_seed(config.seed * 1_000_003 + self.update))
            self.policy.eval()
            start = time.perf_counter()
            with full_parameters(self.policy):  # FSDP2: every rank decodes at its own pace
                trajectories = self.rollout(env)
            rollout_time = time.perf_counter() - start
            # Every rank's tokens, so that all ranks spend the same budget and stop after the same update.
            local = trajectories.extras.get("sampled_tokens", trajectories.num_tokens)
            tokens = int(all_reduce_sums({"tokens": local}, self.device)["tokens"])
            self.sampled_tokens += tokens
            stats = self.learn(trajectories)
            stats.update(
                kl_coef=config.kl_coef,
                rollout_tokens_per_s=tokens / max(rollout_time, 1e-9),
                update=self.update,
                sampled_tokens=self.sampled_tokens,
                optimizer_steps=self.optimizer_steps,
            )
            history.append(stats)
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(f"{self.algorithm}/{key}", value, self.update)
            done = (total_updates is not None and self.update >= total_updates) or (
                total_tokens is not None and self.sampled_tokens >= total_tokens
            )
            if checkpoint_dir is not None and (self.update % checkpoint_every == 0 or done):
                self.save_checkpoint(checkpoint_dir)
            if callback is not None:  # after the checkpoint: a callback that stops the run loses nothing
                callback(self.update, stats)
            bar.update(tokens if by_tokens else 1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}")
        bar.close()
        if writer is not None:
            writer.close()
        return history

    # -------------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Save policy (LoRA adapters only with LoRA), optimizer, scheduler, RNG states, the update and
        sampled-token counters and the config, atomically. On N processes every rank calls it and rank 0
        writes (the full weights, and every rank's RNG state)."""
        return save_training_state(
            path,
            modules={"policy": self.policy},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={
                "algorithm": self.algorithm,
                "update": self.update,
                "sampled_tokens": self.sampled_tokens,
                "optimizer_steps": self.optimizer_steps,
                "config": jsonable(dataclasses.asdict(self.config)),
            },
            trainable_only=bool(self.config.lora_rank),
            optimizer_model=self._trainer,
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` of the same algorithm (same model source)."""
        written = Path(path) / "state.json"
        algorithm = json.loads(written.read_text()).get("algorithm") if written.is_file() else self.algorithm
        if algorithm != self.algorithm:  # checked before anything is loaded: the agent stays usable
            raise ValueError(
                f"{path} is a {algorithm!r} checkpoint, not {self.algorithm!r}: resume it with the agent "
                "that wrote it"
            )
        self.scheduler = make_scheduler(self.optimizer, self.config.lr_schedule, total_steps=1)
        state = load_training_state(
            path,
            modules={"policy": self.policy},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            optimizer_model=self._trainer,
        )
        self.update = int(state["update"])
        self.sampled_tokens = int(state["sampled_tokens"])
        self.optimizer_steps = int(state.get("optimizer_steps", 0))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the policy as a plain transformers model (LoRA merged) with its tokenizer (on N processes every
        rank calls it and rank 0 writes)."""
        save_policy(self.policy, self.tokenizer, path)
