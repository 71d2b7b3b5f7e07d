"""Token-level PPO through the Gym API (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

The agent acts in a :class:`~llm_env.TextGenVectorEnv` token by token with its own KV cache and reports
the log-probability of each token, so the environment pays the exact per-token KL penalty. After a
rollout of ``episodes_per_update`` finished episodes, one teacher-forced forward pass per minibatch
recomputes the old log-probabilities and values, GAE turns the environment's per-token rewards into
advantages, and ``ppo_epochs`` passes of minibatches optimise the clipped surrogate, the clipped value
loss, an optional entropy bonus and the optional PPO-ptx language-modelling term.

Reading order: :class:`PPOConfig` (every knob, with defaults from TRL's PPO trainer and Llama 2),
:meth:`PPOAgent.act` (acting), :meth:`PPOAgent.learn` (the update), :meth:`PPOAgent.train` (the loop).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.checkpoint import load_training_state, save_training_state
from agents.kl_controllers import AdaptiveKLController, FixedKLController
from agents.losses import explained_variance, gae, masked_mean, masked_whiten, policy_loss, value_loss
from agents.policy import (
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
from agents.tracking import append_stat as _append
from agents.tracking import jsonable as _jsonable
from agents.tracking import tensorboard_writer as _tensorboard
from llm_env import AdapterDisabled, TextGenVectorEnv, TokenActions
from llm_env.kl import check_kl_coef
from llm_env.models import pad_token_id
from llm_env.training import make_optimizer, make_scheduler, trainable_parameters

__all__ = ["PPOAgent", "PPOConfig"]


@dataclass
class PPOConfig:
    """Options of :class:`PPOAgent`. Defaults follow TRL's last PPO trainer unless noted."""

    learning_rate: float = 1e-5
    """AdamW learning rate (Llama 2 used 1e-6 on 7B-70B; tiny models need ~1e-3)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (Llama 2)."""
    adam_eps: float = 1e-5
    """AdamW epsilon (Llama 2)."""
    weight_decay: float = 0.0
    """AdamW weight decay (Llama 2: 0.1)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (Llama 2: 1.0)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the updates of :meth:`PPOAgent.train`."""
    warmup_updates: int = 0
    """Updates of linear learning-rate warmup."""
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
    lora_rank: int = 0
    """Train LoRA adapters of this rank; the reference is then the base with adapters disabled (0: full)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Modules that receive LoRA adapters."""
    fuse_reference: bool = True
    """With LoRA, let the environment decode the policy and its adapter-disabled reference in one forward
    pass over 2B rows (``AdapterDisabled(policy, fuse=True)``) and act from the policy half instead of a
    second decode: same tokens, log-probabilities and rewards up to float rounding, one pass over the base
    weights per token instead of two (see :class:`llm_env.decoding.FusedDecoder`; 1.34x faster rollouts on
    2 CPU cores). Ignored without LoRA."""
    cuda_graphs: bool = False
    """Replay the decode steps of the agent's sampler and of environments built by :meth:`PPOAgent.make_env`
    as CUDA graphs (CUDA only; see :class:`llm_env.IncrementalLM`)."""
    seed: int = 0
    """Seed of everything random: rollout prompts, sampling, minibatch order."""
    log_dir: str | None = None
    """Write TensorBoard logs here."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
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
        check(self.clip_range > 0, "clip_range must be > 0")
        check(self.temperature > 0, "temperature must be > 0")
        check_kl_coef(self.kl_coef)
        check(not self.adaptive_kl or self.kl_coef > 0, "adaptive_kl needs an initial kl_coef > 0")
        check(self.ptx_coef >= 0, "ptx_coef must be >= 0")
        check(self.lora_rank >= 0, "lora_rank must be >= 0 (0 disables LoRA)")
        check(self.reward_clip is None or self.reward_clip > 0, "reward_clip must be > 0 or None")
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)


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
        self.value_head = ValueHead(hidden_size(model)).to(device)
        self.optimizer = make_optimizer(
            trainable_parameters(self.policy, self.value_head),
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
        logits the environment computes (see :meth:`TokenSampler.attach`)."""
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
        """The PPO-ptx batch of optimizer step ``step`` of this update, a pure function of (seed, update,
        step) so that resumed runs draw the same batches."""
        rng = np.random.default_rng((self.config.seed, self.update, step))
        size = min(self.config.ptx_batch_size, len(self._ptx))
        chunk = [self._ptx[i] for i in rng.choice(len(self._ptx), size=size, replace=False)]
        return SequenceBatch.build(
            [c[:1] for c in chunk], [c[1:] for c in chunk], pad_id=self.pad_id, device=self.device
        )

    def _score(self, batch: SequenceBatch, *, grad: bool) -> Any:
        with torch.set_grad_enabled(grad):
            return response_forward(
                self.policy,
                batch,
                temperature=self.config.temperature,
                value_head=self.value_head,
                entropy=grad,
            )

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        """One PPO update on finished episodes; returns the diagnostics (means over minibatches)."""
        config = self.config
        start_time = time.perf_counter()
        batch = SequenceBatch.build(
            trajectories.prompt_ids, trajectories.response_list(), pad_id=self.pad_id, device=self.device
        )
        mask = batch.response_mask
        rewards = trajectories.rewards.to(self.device).float()[:, : mask.shape[1]] * mask
        if config.reward_clip is not None:
            rewards = rewards.clamp(-config.reward_clip, config.reward_clip)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)

        self.policy.eval()  # no dropout: the ratio must be exactly 1 before the first step (TRL does the same)
        n = len(batch)
        old_logprobs = torch.zeros_like(rewards)
        old_values = torch.zeros_like(rewards)
        for start in range(0, n, config.minibatch_size):
            index = torch.arange(start, min(n, start + config.minibatch_size), device=self.device)
            scores = self._score(batch.select(index), grad=False)
            steps = scores.logprobs.shape[1]
            old_logprobs[index, :steps] = scores.logprobs
            old_values[index, :steps] = scores.values
        advantages, returns = gae(rewards, old_values, mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)

        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.update)
        micro = config.minibatch_size // config.gradient_accumulation_steps
        stats: dict[str, list[float]] = {}
        optimizer_step = 0
        for _ in range(config.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, config.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for micro_start in range(start, min(n, start + config.minibatch_size), micro):
                    index = order[micro_start : micro_start + micro].to(self.device)
                    sub = batch.select(index)
                    steps = sub.response_mask.shape[1]
                    new = self._score(sub, grad=True)
                    sub_mask = sub.response_mask
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
                    loss = pg_loss + config.vf_coef * vf_loss - config.ent_coef * entropy
                    if self._ptx is not None:
                        ptx = self._ptx_batch(optimizer_step)
                        ptx_nll = -masked_mean(response_forward(self.policy, ptx).logprobs, ptx.response_mask)
                        loss = loss + config.ptx_coef * ptx_nll
                        _append(stats, "ptx_loss", ptx_nll)
                    (loss / config.gradient_accumulation_steps).backward()
                    _append(stats, "policy_loss", pg_loss)
                    _append(stats, "value_loss", vf_loss)
                    _append(stats, "entropy", entropy)
                    for key, value in pg_stats.items():
                        _append(stats, key, value)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    trainable_parameters(self.policy, self.value_head), config.max_grad_norm
                )
                _append(stats, "grad_norm", grad_norm)
                self.optimizer.step()
                optimizer_step += 1
        self.scheduler.step()
        self.update += 1
        tokens = int(mask.sum())
        out = {key: float(np.mean(values)) for key, values in stats.items()}
        out.update(
            score=float(np.mean(trajectories.scores)),
            kl=float(np.nanmean(trajectories.kl)) if np.isfinite(trajectories.kl).any() else float("nan"),
            response_length=float(np.mean(trajectories.lengths)),
            explained_variance=float(explained_variance(old_values, returns, mask)),
            value_mean=float(masked_mean(old_values, mask)),
            advantage_std=float(torch.sqrt(masked_mean(advantages**2, mask))),
            update_tokens_per_s=tokens * config.ppo_epochs / max(time.perf_counter() - start_time, 1e-9),
            learning_rate=float(self.scheduler.get_last_lr()[0]),
        )
        return out

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
        writer = _tensorboard(config.log_dir)
        history = []
        bar = tqdm(total=total, initial=self.update, desc="ppo", disable=not config.progress)
        while self.update < total and (total_tokens is None or self.sampled_tokens < total_tokens):
            env.kl_coef = self.kl_controller.value
            self._generator.manual_seed(config.seed * 1_000_003 + self.update)
            start = time.perf_counter()
            self.policy.eval()
            trajectories = collect_episodes(
                env, self, config.episodes_per_update, seed=config.seed + self.update
            )
            rollout_time = time.perf_counter() - start
            self.sampled_tokens += trajectories.num_tokens
            kl_coef = self.kl_controller.value
            stats = self.learn(trajectories)
            self.kl_controller.update(stats["kl"], len(trajectories))
            stats.update(
                kl_coef=kl_coef,
                rollout_tokens_per_s=float(trajectories.lengths.sum()) / max(rollout_time, 1e-9),
                update=self.update,
                sampled_tokens=self.sampled_tokens,
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
        controller, RNG states and the update counter, atomically."""
        return save_training_state(
            path,
            modules={"policy": self.policy, "value_head": self.value_head},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={
                "update": self.update,
                "sampled_tokens": self.sampled_tokens,
                "kl_controller": self.kl_controller.state_dict(),
                "config": _jsonable(dataclasses.asdict(self.config)),
            },
            trainable_only=bool(self.config.lora_rank),
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` into this agent (same model source)."""
        self.scheduler = make_scheduler(self.optimizer, self.config.lr_schedule, total_steps=1)
        state = load_training_state(
            path,
            modules={"policy": self.policy, "value_head": self.value_head},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        self.update = int(state["update"])
        self.sampled_tokens = int(state.get("sampled_tokens", 0))
        self.kl_controller.load_state_dict(state["kl_controller"])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the policy as a plain transformers model (LoRA merged) with its tokenizer."""
        save_policy(self.policy, self.tokenizer, path)
