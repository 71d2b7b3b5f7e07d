"""Token-level PPO through the Gym API (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

The agent acts in a :class:`~llm_env.TextGenVectorEnv` token by token with its own KV cache and reports
the log-probability of each token, so the environment pays the exact per-token KL penalty. After a
rollout of ``episodes_per_update`` finished episodes, one teacher-forced forward pass per minibatch
recomputes the old log-probabilities and values, GAE turns the environment's per-token rewards into
advantages, and ``ppo_epochs`` passes of minibatches optimise the clipped surrogate, the clipped value
loss, an optional entropy bonus and the optional PPO-ptx language-modelling term.

Reading order: :class:`PPOConfig` (every knob, with defaults from TRL's PPO trainer and Llama 2),
:meth:`PPOAgent.act` (acting), :meth:`PPOAgent.learn` (the update), :meth:`PPOAgent.train` (the loop).

On N processes (``torchrun --nproc-per-node N``, see :mod:`llm_env.distributed`) each rank collects
``episodes_per_update / N`` episodes on its own shard of the prompts; the minibatches are dealt by one
permutation of every rank's episodes (numbered in rank order), so each is the minibatch one process holding
them all would use, and each rank holds its episodes of it; advantages are whitened with the mean and
variance of all ranks' tokens, the loss of a minibatch is normalised by its token count over all ranks and
the gradients are averaged by DDP (or reduce-scattered by FSDP2), so an update equals the single-process
update on the same episodes.
The KL that drives the adaptive controller and the logged statistics are global too; rank 0 writes logs,
TensorBoard and checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.checkpoint import load_training_state, save_training_state
from agents.kl_controllers import AdaptiveKLController, FixedKLController
from agents.losses import gae, masked_mean, policy_loss, value_loss
from agents.options import OnPolicyOptions
from agents.policy import (
    Critic,
    SequenceBatch,
    TokenSampler,
    ValueHead,
    add_lora,
    hidden_size,
    load_policy,
    response_forward,
    save_policy,
)
from agents.rollout import Trajectories, collect_episodes
from agents.tracking import append_stat, jsonable, tensorboard_writer
from llm_env import AdapterDisabled, TextGenVectorEnv, TokenActions
from llm_env.distributed import (
    all_reduce_means,
    all_reduce_sum,
    check_divisible,
    data_parallel,
    deal_minibatches,
    full_parameters,
    global_masked_mean,
    global_masked_var,
    global_masked_whiten,
    gradient_sync,
    init_distributed,
    is_main_process,
    rank_seed,
    shard_prompts,
    stand_in,
    world_size,
)
from llm_env.kl import check_kl_coef
from llm_env.models import pad_token_id
from llm_env.training import make_optimizer, make_scheduler, trainable_parameters

__all__ = ["PPOAgent", "PPOConfig"]


@dataclass
class PPOConfig(OnPolicyOptions):
    """Options of :class:`PPOAgent`. Defaults follow TRL's last PPO trainer unless noted; the optimizer, LoRA,
    strategy, seed and logging fields come from :class:`~agents.options.OnPolicyOptions`."""

    learning_rate: float = 1e-5
    """AdamW learning rate (Llama 2 used 1e-6 on 7B-70B; tiny models need ~1e-3)."""
    episodes_per_update: int = 64
    """Finished episodes collected per PPO update (the rollout batch; Llama 2: 512)."""
    minibatch_size: int = 16
    """Episodes per optimizer step (Llama 2: 64)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch; gradients are accumulated across them."""
    ppo_epochs: int = 4
    """Passes over the rollout per update (Llama 2: 1)."""
    gamma: float = 1.0
    """Discount (1.0: the reward model judges whole responses)."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float | None = 0.2
    """Value clip around the old values (None: no clipping)."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    critic: str | None = None
    """A reward model (path or hub name of a one-label sequence-classification checkpoint with the policy's
    tokenizer) to initialise a separate critic from, as InstructGPT does (:class:`~agents.policy.Critic`);
    None: a value head on the policy's trunk, which starts at zero. The separate critic costs a second
    forward and backward pass per minibatch; it is trained fully (not with LoRA)."""
    value_learning_rate: float | None = None
    """Learning rate of the value head, or of the whole separate critic (None: ``learning_rate``); split
    actor-critic implementations give the critic its own (OpenRLHF's runs at about 10x the actor's). On
    the quick benchmark a shared-trunk head at 10x or 100x the policy's rate still predicted the next
    rollout's returns no better than a constant (explained variance about 0: with 64 episodes per update a
    linear head on the policy's features overfits each rollout); the reward-model critic (``critic``) is
    what made the values useful (explained variance 0.1 to 0.5)."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten_advantages: bool = True
    """Normalise advantages over the tokens of the rollout."""
    whiten_rewards: bool = False
    """Normalise per-token rewards over the rollout before GAE (keeps their mean)."""
    reward_clip: float | None = None
    """Clip per-token rewards to [-c, c] before GAE."""
    temperature: float = 1.0
    """Sampling temperature of the behaviour policy (used in the losses too, as TRL does)."""
    kl_coef: float = 0.05
    """Initial beta of the environment's per-token KL penalty."""
    adaptive_kl: bool = False
    """Adapt beta towards ``kl_target`` (Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target of the summed KL per episode for the adaptive controller."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive controller, in episodes."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight gamma of the pretraining log-likelihood mixed into the loss (InstructGPT: 27.8)."""
    ptx_batch_size: int = 8
    """Pretraining texts per optimizer step for PPO-ptx."""

    def __post_init__(self) -> None:
        super().__post_init__()

        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.episodes_per_update >= 1, "episodes_per_update must be >= 1")
        check(
            self.minibatch_size >= 1 and self.episodes_per_update % self.minibatch_size == 0,
            f"minibatch_size ({self.minibatch_size}) must divide episodes_per_update ({self.episodes_per_update}); "
            "pick e.g. minibatch_size = episodes_per_update // 4",
        )
        check(
            self.gradient_accumulation_steps >= 1
            and self.minibatch_size % self.gradient_accumulation_steps == 0,
            f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide minibatch_size "
            f"({self.minibatch_size})",
        )
        check(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        check(
            self.value_learning_rate is None or self.value_learning_rate > 0,
            f"value_learning_rate must be > 0 or None, got {self.value_learning_rate}",
        )
        check(self.clip_range > 0, "clip_range must be > 0")
        check(self.temperature > 0, "temperature must be > 0")
        check_kl_coef(self.kl_coef)
        check(not self.adaptive_kl or self.kl_coef > 0, "adaptive_kl needs an initial kl_coef > 0")
        check(self.ptx_coef >= 0, "ptx_coef must be >= 0")
        check(self.reward_clip is None or self.reward_clip > 0, "reward_clip must be > 0 or None")

    def check_world_size(self, world: int) -> None:
        """Fail before any work when ``world`` processes cannot split the rollout and the minibatches evenly."""
        for name in ("episodes_per_update", "minibatch_size"):
            check_divisible(
                name,
                getattr(self, name),
                world,
                f"every rank takes {name} / {world} episodes; pick a multiple of {world}",
            )
        local = self.minibatch_size // world
        if local % self.gradient_accumulation_steps:
            raise ValueError(
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) must divide the per-rank "
                f"minibatch minibatch_size / world size = {self.minibatch_size} / {world} = {local}"
            )


class _ActorCritic(nn.Module):
    """The policy and its value head (or separate critic) as one module, so that one DDP / FSDP wrapper
    averages the gradients of both and a training micro-step is one forward call (PPO-ptx included; DDP
    expects one forward per backward)."""

    def __init__(self, policy: nn.Module, value_head: ValueHead, critic: Critic | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def forward(
        self, batch: SequenceBatch, *, temperature: float, entropy: bool, ptx: SequenceBatch | None = None
    ) -> tuple[Any, torch.Tensor | None]:
        shared = self.value_head if self.critic is None else None
        scores = response_forward(
            self.policy, batch, temperature=temperature, value_head=shared, entropy=entropy
        )
        if self.critic is not None:
            scores.values = self.critic(batch)
        ptx_logprobs = response_forward(self.policy, ptx).logprobs if ptx is not None else None
        return scores, ptx_logprobs


class PPOAgent:
    """Token-level PPO on a transformers causal LM.

    Args:
        policy: the SFT model to optimise (a causal LM object, or a path / hub name).
        tokenizer: its tokenizer (default: loaded from ``policy`` when that is a path).
        config: :class:`PPOConfig`.
        reference: the frozen reference; default: the policy's base with LoRA adapters disabled when
            ``lora_rank > 0``, otherwise a frozen copy of the initial policy. A path or model may be given
            (the iterative pipeline uses the SFT model while the policy starts from a later round).
        ptx_texts: pretraining / SFT texts for PPO-ptx (``config.ptx_coef > 0``).
        device: where the policy lives (default: the model's device, or CUDA when available for paths).

    The value function is a :class:`~agents.policy.ValueHead` on the policy's final hidden state (shared
    trunk). Use :meth:`make_env` to build an environment wired to this agent's reference, or pass
    :attr:`reference` to your own.
    """

    def __init__(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: PPOConfig | None = None,
        *,
        reference: nn.Module | str | os.PathLike | None = None,
        ptx_texts: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config = config or PPOConfig()
        init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
        self.world_size = world_size()
        config.check_world_size(self.world_size)
        model, self.tokenizer, device = load_policy(policy, tokenizer, device)
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
        self.critic: Critic | None = None
        """The separate critic (``config.critic``), or None for the value head on the policy's trunk."""
        if config.critic is not None:
            self.critic = Critic.from_reward_model(config.critic, tokenizer=self.tokenizer, device=device)
            self.value_head = self.critic.head
        else:
            self.value_head = ValueHead(hidden_size(model)).to(device)
        value_modules = self._value_modules()
        # What the update calls: DDP over policy + value head (or critic), or both sharded in place (FSDP2);
        # the policy itself acts (a DDP replica or full FSDP weights decode without collectives).
        self._trainer = data_parallel(
            _ActorCritic(self.policy, self.value_head, self.critic),
            strategy=config.strategy,
            shard=[self.policy, *value_modules],
        )
        params: list[Any] = trainable_parameters(self.policy, *value_modules)
        if config.value_learning_rate is not None:  # a second parameter group for the value function
            params = [
                {"params": trainable_parameters(self.policy)},
                {"params": trainable_parameters(*value_modules), "lr": config.value_learning_rate},
            ]
        self.optimizer = make_optimizer(
            params,
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
        )
        self.scheduler = make_scheduler(self.optimizer, "constant", total_steps=1)
        if config.adaptive_kl:
            self.kl_controller: FixedKLController = AdaptiveKLController(
                config.kl_coef, config.kl_target, config.kl_horizon
            )
        else:
            self.kl_controller = FixedKLController(config.kl_coef)
        if config.ptx_coef > 0 and not ptx_texts:
            raise ValueError("ptx_coef > 0 needs ptx_texts=... (pretraining or SFT texts)")
        self._ptx: list[list[int]] | None = None
        if config.ptx_coef > 0:
            self._ptx = [ids for ids in self.tokenizer(list(ptx_texts))["input_ids"] if len(ids) >= 2]
            if not self._ptx:
                raise ValueError("ptx_texts must contain texts of at least two tokens")
        self.update = 0
        self.sampled_tokens = 0
        """Response tokens sampled in the rollouts so far (the budget ``train(total_tokens=...)`` spends)."""
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
        """The acting half: samples with the policy's KV cache, or from an attached environment's fused
        policy logits (:meth:`TokenSampler.attach`)."""

    # ------------------------------------------------------------------------------------- wiring
    @property
    def reference(self) -> Any:
        """What to pass as the environment's ``reference``."""
        return self._reference

    def make_env(
        self, prompts: Any, reward: Any, *, num_envs: int = 16, **env_kwargs: Any
    ) -> TextGenVectorEnv:
        """A :class:`~llm_env.TextGenVectorEnv` with this agent's tokenizer, reference, device and beta.

        The agent's sampler is attached to it, so with a fused LoRA reference it acts from the policy
        logits the environment computes (see :meth:`TokenSampler.attach`). On N processes each rank's
        environment gets its own disjoint, seeded shard of ``prompts``
        (:func:`llm_env.distributed.shard_prompts`)."""
        prompts = shard_prompts(
            prompts, num_envs=num_envs, seed=self.config.seed, key=env_kwargs.get("prompt_key", "prompt")
        )
        options = dict(
            prompts=prompts,
            reward=reward,
            tokenizer=self.tokenizer,
            reference=self.reference,
            kl_coef=self.kl_controller.value,
            device=self.device,
        )
        if self.config.cuda_graphs:
            options["cuda_graphs"] = True
        options.update(env_kwargs)
        env = TextGenVectorEnv(num_envs=num_envs, **options)
        self.sampler.attach(env)
        return env

    # -------------------------------------------------------------------------------------- acting
    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Sample the next tokens with the policy's KV cache; report their log-probabilities."""
        return self.sampler.act(obs, restarted)

    # ------------------------------------------------------------------------------------ learning
    def _ptx_batch(self, step: int) -> SequenceBatch:
        """The PPO-ptx batch of optimizer step ``step`` of this update, a pure function of (seed, rank, update,
        step) so that resumed runs draw the same batches (each rank its own)."""
        rng = np.random.default_rng((rank_seed(self.config.seed), self.update, step))
        size = min(self.config.ptx_batch_size, len(self._ptx))
        chunk = [self._ptx[i] for i in rng.choice(len(self._ptx), size=size, replace=False)]
        return SequenceBatch.build(
            [c[:1] for c in chunk], [c[1:] for c in chunk], pad_id=self.pad_id, device=self.device
        )

    def _score(self, batch: SequenceBatch, *, grad: bool, ptx: SequenceBatch | None = None) -> Any:
        with torch.set_grad_enabled(grad):
            return self._trainer(batch, temperature=self.config.temperature, entropy=grad, ptx=ptx)

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        """One PPO update on finished episodes; returns the diagnostics (means over minibatches).

        On N processes every rank calls it with its own ``episodes_per_update / N`` episodes; the update is
        the one a single process would make on all of them in rank order (the same minibatches, dealt by one
        permutation of every rank's episodes; global whitening; loss normalised by the minibatch's tokens over
        all ranks; gradients averaged), and the returned statistics are global.
        """
        config = self.config
        world = self.world_size
        if world > 1 and len(trajectories) != config.episodes_per_update // world:
            # Every rank must run as many minibatches (collectives) as the others, or they would wait forever.
            raise ValueError(
                f"on {world} processes each rank learns from episodes_per_update / {world} = "
                f"{config.episodes_per_update // world} episodes, got {len(trajectories)}"
            )
        start_time = time.perf_counter()
        batch = trajectories.sequences(pad_id=self.pad_id, device=self.device)
        mask = batch.response_mask
        rewards = trajectories.rewards.to(self.device).float()[:, : mask.shape[1]] * mask
        if config.reward_clip is not None:
            rewards = rewards.clamp(-config.reward_clip, config.reward_clip)
        if config.whiten_rewards:
            rewards = global_masked_whiten(rewards, mask, shift_mean=False)

        self.policy.eval()  # no dropout: the ratio must be exactly 1 before the first step (TRL does the same)
        if self.critic is not None:
            self.critic.eval()  # and the old values are the ones the clipped value loss starts from
        n = len(batch)
        minibatch = config.minibatch_size // world  # this rank's share of every minibatch
        old_logprobs = torch.zeros_like(rewards)
        old_values = torch.zeros_like(rewards)
        for start in range(0, n, minibatch):
            index = torch.arange(start, min(n, start + minibatch), device=self.device)
            scores, _ = self._score(batch.select(index), grad=False)
            steps = scores.logprobs.shape[1]
            old_logprobs[index, :steps] = scores.logprobs
            old_values[index, :steps] = scores.values
        advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = global_masked_whiten(advantages, mask)

        # The minibatches of every epoch, dealt by one permutation of every rank's episodes (the same generator
        # on every rank: minibatch k is the single-process one; each rank holds its episodes of it), and each
        # minibatch's token count over all ranks (one collective): a micro-batch's token-mean loss is weighted
        # by its share of the minibatch's tokens, so the accumulated and rank-averaged gradient is that of the
        # token mean over the whole minibatch however its episodes are spread.
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.update)
        minibatches = deal_minibatches(
            [n] * world,
            config.minibatch_size,
            epochs=config.ppo_epochs,
            generator=generator,
            device=self.device,
        )
        tokens_per_episode = mask.sum(dim=1).to(torch.float64)
        minibatch_tokens = all_reduce_sum(
            torch.stack([tokens_per_episode[m.rows].sum() for m in minibatches])
        ).tolist()
        micro = minibatch // config.gradient_accumulation_steps  # at most this many episodes per pass
        stats: dict[str, list[float]] = {}
        for optimizer_step, dealt in enumerate(minibatches):
            self.optimizer.zero_grad(set_to_none=True)
            share = minibatch_tokens[optimizer_step] / world  # tokens per rank, on average
            # As many micro-batches on every rank (each backward pass is a collective).
            micro_batches = dealt.micro_batches(micro)
            for i, index in enumerate(micro_batches):
                # A rank left without episodes of this minibatch runs a pass on a row that carries no loss.
                index, placeholder = stand_in(index)
                sub = batch.select(index)
                steps = sub.response_mask.shape[1]
                ptx = self._ptx_batch(optimizer_step) if self._ptx is not None else None
                with gradient_sync(self._trainer, i == len(micro_batches) - 1):
                    new, ptx_logprobs = self._score(sub, grad=True, ptx=ptx)
                    sub_mask = torch.zeros_like(sub.response_mask) if placeholder else sub.response_mask
                    pg_loss, pg_stats = policy_loss(
                        new.logprobs,
                        old_logprobs[index, :steps],
                        advantages[index, :steps],
                        sub_mask,
                        clip_range=config.clip_range,
                    )
                    vf_loss = value_loss(
                        new.values,
                        old_values[index, :steps],
                        returns[index, :steps],
                        sub_mask,
                        clip_range=config.clip_range_value,
                    )
                    entropy = masked_mean(new.entropy, sub_mask)
                    loss = (pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy) * (
                        sub_mask.sum() / share
                    )
                    if ptx is not None:  # this rank's PPO-ptx batch, spread over the step's micro-batches
                        ptx_nll = -masked_mean(ptx_logprobs, ptx.response_mask)
                        loss = loss + config.ptx_coef * ptx_nll / len(micro_batches)
                        append_stat(stats, "ptx_loss", ptx_nll)
                    loss.backward()
                if not placeholder:
                    append_stat(stats, "policy_loss", pg_loss)
                    append_stat(stats, "value_loss", vf_loss)
                    append_stat(stats, "entropy", entropy)
                    for key, value in pg_stats.items():
                        append_stat(stats, key, value)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable_parameters(self.policy, *self._value_modules()), config.max_grad_norm
            )
            append_stat(stats, "grad_norm", grad_norm)
            self.optimizer.step()
            self.optimizer_steps += 1
        self.scheduler.step()
        self.update += 1
        out = all_reduce_means({key: float(np.mean(values)) for key, values in stats.items()}, self.device)
        out.update(self._episode_stats(trajectories))
        var_returns = global_masked_var(returns, mask)
        out.update(
            explained_variance=float(
                1.0 - global_masked_var(returns - old_values, mask) / var_returns.clamp(min=1e-8)
            ),
            value_mean=float(global_masked_mean(old_values, mask)),
            advantage_std=float(torch.sqrt(global_masked_mean(advantages**2, mask))),
            update_tokens_per_s=out["tokens"]
            * config.ppo_epochs
            / max(time.perf_counter() - start_time, 1e-9),
            learning_rate=float(self.scheduler.get_last_lr()[0]),
        )
        del out["tokens"]
        return out

    def _episode_stats(self, trajectories: Trajectories) -> dict[str, float]:
        """Mean score, KL (over episodes that report one) and response length of every rank's episodes."""
        kl = trajectories.kl[np.isfinite(trajectories.kl)]
        totals = torch.tensor(
            [
                trajectories.scores.sum(),
                len(trajectories),
                kl.sum(),
                len(kl),
                trajectories.lengths.sum(),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        score, episodes, kl_sum, kl_count, tokens = all_reduce_sum(totals).tolist()
        return {
            "score": score / episodes,
            "kl": kl_sum / kl_count if kl_count else float("nan"),
            "response_length": tokens / episodes,
            "tokens": tokens,
        }

    # ------------------------------------------------------------------------------------- the loop
    def train(
        self,
        env: TextGenVectorEnv,
        total_updates: int,
        *,
        total_tokens: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """Run PPO until ``total_updates`` updates are done (continuing from ``self.update`` after a resume),
        or, with ``total_tokens``, until the rollouts have sampled that many response tokens (the update that
        reaches the budget is the last; :attr:`sampled_tokens` says how many were sampled).

        Each update resets the environment with ``seed + update`` and seeds sampling and minibatch order
        the same way, so a run resumed from a checkpoint continues exactly as the uninterrupted run.
        Returns the per-update diagnostics (score, kl, kl_coef, approx_kl, clipfrac, entropy, losses,
        explained_variance, rollout and update throughput). The sampler is attached to ``env`` (fused
        policy logits are used when ``env`` decodes this policy with its reference).

        On N processes every rank calls it with its own environment (:meth:`make_env` shards the prompts)
        and collects ``episodes_per_update / N`` episodes per update with its own seeds
        (:func:`llm_env.distributed.rank_seed`); every rank returns the same global statistics, and only rank
        0 writes TensorBoard logs, the progress bar and the checkpoint files.
        """
        config = self.config
        total = int(total_updates)
        self.sampler.attach(env)
        self.scheduler = make_scheduler(
            self.optimizer,
            config.lr_schedule,
            total_steps=total,
            warmup_steps=config.warmup_updates,
            completed_steps=self.update,
        )
        main = is_main_process()
        writer = tensorboard_writer(config.log_dir) if main else None
        history = []
        bar = tqdm(total=total, initial=self.update, desc="ppo", disable=not config.progress or not main)
        while self.update < total and (total_tokens is None or self.sampled_tokens < total_tokens):
            env.kl_coef = self.kl_controller.value
            self._generator.manual_seed(rank_seed(config.seed * 1_000_003 + self.update))
            start = time.perf_counter()
            self.policy.eval()
            with full_parameters(self.policy):  # FSDP2: every rank decodes at its own pace
                trajectories = collect_episodes(
                    env,
                    self,
                    config.episodes_per_update // self.world_size,
                    seed=rank_seed(config.seed + self.update),
                )
            rollout_time = time.perf_counter() - start
            kl_coef = self.kl_controller.value
            stats = self.learn(trajectories)
            # Every rank's tokens (the statistics are global), so all ranks stop at the same update.
            self.sampled_tokens += round(stats["response_length"] * config.episodes_per_update)
            self.kl_controller.update(stats["kl"], config.episodes_per_update)
            stats.update(
                kl_coef=kl_coef,
                rollout_tokens_per_s=stats["response_length"]
                * config.episodes_per_update
                / max(rollout_time, 1e-9),
                update=self.update,
                sampled_tokens=self.sampled_tokens,
                optimizer_steps=self.optimizer_steps,
            )
            history.append(stats)
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(f"ppo/{key}", value, self.update)
            if checkpoint_dir is not None and (self.update % checkpoint_every == 0 or self.update == total):
                self.save_checkpoint(checkpoint_dir)
            if callback is not None:  # after the checkpoint: a callback that stops the run loses nothing
                callback(self.update, stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", beta=f"{kl_coef:.3g}")
        bar.close()
        if writer is not None:
            writer.close()
        return history

    # -------------------------------------------------------------------------------- checkpointing
    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Save policy (LoRA adapters only when LoRA is on), value head, optimizer, scheduler, KL
        controller, RNG states and the update counter, atomically. On N processes every rank calls it and
        rank 0 writes (the full weights, and every rank's RNG state)."""
        return save_training_state(
            path,
            modules=self._modules(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={
                "update": self.update,
                "sampled_tokens": self.sampled_tokens,
                "optimizer_steps": self.optimizer_steps,
                "kl_controller": self.kl_controller.state_dict(),
                "config": jsonable(dataclasses.asdict(self.config)),
            },
            trainable_only=bool(self.config.lora_rank),
            optimizer_model=self._trainer,
        )

    def _value_modules(self) -> list[nn.Module]:
        return [self.value_head] if self.critic is None else [self.critic]

    def _modules(self) -> dict[str, nn.Module]:
        """What a checkpoint holds: the policy and the value head, or the separate critic."""
        if self.critic is None:
            return {"policy": self.policy, "value_head": self.value_head}
        return {"policy": self.policy, "critic": self.critic}

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` into this agent (same model source)."""
        self.scheduler = make_scheduler(self.optimizer, self.config.lr_schedule, total_steps=1)
        state = load_training_state(
            path,
            modules=self._modules(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            optimizer_model=self._trainer,
        )
        self.update = int(state["update"])
        self.sampled_tokens = int(state.get("sampled_tokens", 0))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.kl_controller.load_state_dict(state["kl_controller"])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the policy as a plain transformers model (LoRA merged) with its tokenizer (on N processes
        every rank calls it and rank 0 writes)."""
        save_policy(self.policy, self.tokenizer, path)
