"""Online DPO: DPO on fresh samples ranked by the reward model (Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback").

Offline DPO learns from pairs sampled once, from another policy; as training moves the policy away from
that data, the pairs stop saying anything about the responses it now gives. Guo et al. make DPO on-policy:
each update samples two responses per prompt from the *current* policy, an annotator (here the reward
model, through the environment's final score) picks the chosen and the rejected one, and one DPO step is
taken on those pairs against the frozen reference (the SFT model). Ties carry no preference: their pairs are
skipped and counted.

The responses are sampled through :class:`~llm_env.TextGenVectorEnv` with the Gym API, like every agent here:
an environment with ``AutoresetMode.DISABLED`` and forced prompts, each prompt twice (as rejection sampling
draws its k samples), whose ``info["completion"]["score"]`` is the reward model's score. The environment's KL
coefficient is 0 (DPO regularises through beta in the loss); with a reference it still measures the KL to it,
which is logged. The loss, the pair layout and the reference handling are those of :mod:`agents.dpo`.

On N processes (``torchrun --nproc-per-node N``, see :mod:`llm_env.distributed`) every rank samples its own
``prompts_per_update / N`` prompts from its own shard (two responses each) and finds its pairs; the pairs are
then ordered as if one process held every rank's episodes in rank order, each minibatch is dealt to the ranks
that hold its pairs, the loss is divided by the minibatch's pair count over all ranks and DDP adds the ranks'
gradients up, so the update is the single-process update on the same episodes. Ties, pair counts, scores and
the token budget are counted over all ranks; rank 0 writes logs, TensorBoard and checkpoints.

Reading order: :class:`OnlineDPOConfig`, :meth:`OnlineDPOAgent.pairs` (sampled episodes to preference pairs),
:meth:`OnlineDPOAgent.learn` (the update), :meth:`OnlineDPOAgent.train` (the loop).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.dpo import LossType, PreferencePolicy, pair_batch
from agents.policy import SequenceBatch
from agents.rollout import Trajectories, collect_episodes
from agents.tracking import tensorboard_writer
from llm_env import AdapterDisabled, TextGenVectorEnv, TokenActions
from llm_env.distributed import (
    Strategy,
    all_counts,
    all_reduce_sums,
    check_divisible,
    deal_minibatches,
    full_parameters,
    is_main_process,
    rank_seed,
    shard_prompts,
    stand_in,
)
from llm_env.training import make_scheduler

__all__ = ["OnlineDPOAgent", "OnlineDPOConfig"]


@dataclass
class OnlineDPOConfig:
    """Options of :class:`OnlineDPOAgent`. Defaults follow Guo et al. 2024 and TRL's online DPO where noted."""

    loss_type: LossType = "dpo"
    """dpo: -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2. Guo et al. ran both (and SLiC) online."""
    beta: float = 0.1
    """KL strength of the loss (Guo et al. and TRL: 0.1)."""
    average_logprobs: bool = False
    """Average log-probabilities over response tokens instead of summing them (as DPOConfig)."""
    learning_rate: float = 5e-7
    """AdamW learning rate (TRL's online DPO default, for 7B models; tiny models need ~1e-4)."""
    prompts_per_update: int = 32
    """Prompts per update, each answered twice: 2 x this many sampled episodes per update."""
    minibatch_size: int = 8
    """Pairs per optimizer step (2 x this many sequences per forward pass)."""
    epochs: int = 1
    """Passes over each update's pairs (1: every pair is used once, on-policy as in Guo et al.)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the updates of :meth:`OnlineDPOAgent.train`."""
    warmup_updates: int = 0
    """Updates of linear learning-rate warmup."""
    temperature: float = 1.0
    """Sampling temperature; the loss scores responses at the same temperature (as PPO and TRL do)."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank; the reference is then the base with adapters disabled (0: full)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Modules that receive LoRA adapters."""
    fuse_reference: bool = True
    """With LoRA, let environments built by OnlineDPOAgent.make_env decode the policy and its adapter-disabled
    reference in one forward pass and sample from the policy half (as PPOConfig); ignored without LoRA."""
    strategy: Strategy = "ddp"
    """On several processes (torchrun): "ddp" keeps a replica of the policy per rank and averages gradients;
    "fsdp" shards parameters, gradients and optimizer state across ranks (FSDP2; sampling gathers the full
    weights, which must fit one device). Ignored in one process."""
    seed: int = 0
    """Seed of everything random: prompt choice, sampling, minibatch order."""
    log_dir: str | None = None
    """Write TensorBoard logs here."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.loss_type in ("dpo", "ipo"), f"loss_type must be 'dpo' or 'ipo', got {self.loss_type!r}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta} (Guo et al.: 0.1)")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.prompts_per_update >= 1, f"prompts_per_update must be >= 1, got {self.prompts_per_update}")
        check(
            1 <= self.minibatch_size <= self.prompts_per_update,
            f"minibatch_size ({self.minibatch_size}) must be in [1, prompts_per_update "
            f"({self.prompts_per_update})]: it counts pairs, one per prompt",
        )
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        check(self.warmup_updates >= 0, f"warmup_updates must be >= 0, got {self.warmup_updates}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 disables LoRA), got {self.lora_rank}")
        check(self.strategy in ("ddp", "fsdp"), f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)

    def check_world_size(self, world: int) -> None:
        """Fail before any work when ``world`` ranks cannot share the prompts of an update evenly."""
        check_divisible(
            "prompts_per_update",
            self.prompts_per_update,
            world,
            f"every rank samples prompts_per_update / {world} prompts (two responses each); pick a multiple "
            f"of {world}",
        )


class OnlineDPOAgent(PreferencePolicy):
    """Online DPO acting through the Gym API: sample two responses per prompt, let the reward model rank
    them, take DPO steps against the frozen reference.

    Args:
        policy: the SFT model to optimise (a causal LM object, or a path / hub name).
        tokenizer: its tokenizer (default: loaded from ``policy`` when that is a path).
        config: :class:`OnlineDPOConfig`.
        reference: the frozen reference; default: the policy's base with LoRA adapters disabled when
            ``lora_rank > 0``, otherwise a frozen copy of the initial policy.
        device: where the policy lives (default: the model's device, or CUDA when available for paths).
    """

    def __init__(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: OnlineDPOConfig | None = None,
        *,
        reference: nn.Module | str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config = config or OnlineDPOConfig()
        self._setup_policy(policy, tokenizer, config, reference, device)
        self.update = 0
        """Updates done (the resume point)."""
        self.sampled_tokens = 0
        """Response tokens sampled so far (what a token budget counts)."""
        self.ties = 0
        """Pairs skipped so far because the reward model scored both responses the same."""
        self.optimizer_steps = 0
        """Optimizer (gradient) steps taken so far (an update of ties only takes none)."""

    # ------------------------------------------------------------------------------------- wiring
    @property
    def env_reference(self) -> Any:
        """What to pass as the environment's ``reference`` (to measure the KL): the frozen model, or the
        adapter-disabled LoRA policy (fused with the policy's decode when ``fuse_reference``)."""
        if self.reference is not None:
            return self.reference
        return AdapterDisabled(self.policy, fuse=self.config.fuse_reference)

    def make_env(
        self, prompts: Any, reward: Any, *, num_envs: int = 16, **env_kwargs: Any
    ) -> TextGenVectorEnv:
        """A :class:`~llm_env.TextGenVectorEnv` for online DPO: autoreset disabled (prompts are forced), KL
        coefficient 0 (the loss regularises), this agent's tokenizer, device and reference (to measure the
        KL). The sampler is attached to it, to act from fused policy logits when there are any. On N processes
        each rank's environment gets its own disjoint, seeded shard of ``prompts``
        (:func:`llm_env.distributed.shard_prompts`)."""
        prompts = shard_prompts(
            prompts, num_envs=num_envs, seed=self.config.seed, key=env_kwargs.get("prompt_key", "prompt")
        )
        options = dict(
            prompts=prompts,
            reward=reward,
            tokenizer=self.tokenizer,
            reference=self.env_reference,
            kl_coef=0.0,
            device=self.device,
            autoreset_mode=AutoresetMode.DISABLED,
        )
        options.update(env_kwargs)
        env = TextGenVectorEnv(num_envs=num_envs, **options)
        self.sampler.attach(env)
        return env

    # -------------------------------------------------------------------------------------- acting
    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Sample the next tokens with the policy's KV cache; report their log-probabilities."""
        return self.sampler.act(obs, restarted)

    def sample(self, env: TextGenVectorEnv, prompt_indices: np.ndarray, *, seed: int) -> Trajectories:
        """Two responses to each prompt (episodes 2i and 2i + 1 answer ``prompt_indices[i]``)."""
        if env.metadata["autoreset_mode"] != AutoresetMode.DISABLED:
            raise ValueError(
                "online DPO forces prompts: build the env with autoreset_mode=AutoresetMode.DISABLED"
            )
        self.policy.eval()
        self._generator.manual_seed(seed)
        queue = np.repeat(np.asarray(prompt_indices, dtype=np.int64), 2)
        return collect_episodes(env, self, len(queue), seed=seed, prompt_indices=queue)

    # ------------------------------------------------------------------------------------ learning
    def pairs(self, trajectories: Trajectories) -> tuple[SequenceBatch | None, dict[str, float]]:
        """The preference pairs of sampled episodes, as a :func:`~agents.dpo.pair_batch` (None if every pair
        ties): episodes 2i and 2i + 1 answer one prompt, the higher reward-model score is chosen."""
        n = len(trajectories) // 2
        index = trajectories.prompt_index
        if len(trajectories) % 2 or not np.array_equal(index[0::2], index[1::2]):
            raise ValueError(
                "online DPO needs episodes in pairs: episodes 2i and 2i + 1 must answer one prompt"
            )
        scores = trajectories.scores.reshape(n, 2)
        decided = np.flatnonzero(scores[:, 0] != scores[:, 1])  # ties carry no preference: skipped
        first_wins = scores[decided, 0] > scores[decided, 1]
        chosen = 2 * decided + np.where(first_wins, 0, 1)
        rejected = 2 * decided + np.where(first_wins, 1, 0)
        stats = {
            "pairs": float(len(decided)),
            "ties": float(n - len(decided)),
            "score": float(np.mean(trajectories.scores)),
            "chosen_score": float(np.mean(scores.max(axis=1))),
            "rejected_score": float(np.mean(scores.min(axis=1))),
        }
        if not len(decided):
            return None, stats
        responses, masks = trajectories.conversation_list()  # conversations: only the agent's tokens count
        batch = pair_batch(
            [trajectories.prompt_ids[i] for i in chosen],
            [responses[i] for i in chosen],
            [responses[i] for i in rejected],
            pad_id=self.pad_id,
            device=self.device,
            chosen_masks=[masks[i] for i in chosen] if trajectories.multi_turn else None,
            rejected_masks=[masks[i] for i in rejected] if trajectories.multi_turn else None,
        )
        return batch, stats

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        """One online DPO update on two sampled responses per prompt; returns the diagnostics (means over
        minibatches), including the skipped ties.

        On N processes every rank calls it with its own episodes. The pairs are numbered as if one process
        held every rank's episodes in rank order, every minibatch of that order is dealt to the ranks that hold
        its pairs (:func:`~llm_env.distributed.deal_minibatches`; a rank with none joins the gradient
        collective with a pair of no weight) and its loss is divided by its pair count over all ranks, so the
        update is the single-process one on the same episodes; ties, pair counts, scores and sampled tokens
        are counted over all ranks.
        """
        config = self.config
        start_time = time.perf_counter()
        batch, _ = self.pairs(trajectories)
        n = len(batch) // 2 if batch is not None else 0
        counts = all_counts(n, self.device)  # every rank's pair count (one collective)
        total = sum(counts)
        shares: dict[str, list[float]] = {}
        grad_norms: list[float] = []
        if total:
            self.policy.eval()  # no dropout: h is exactly 0 against an identical reference
            if batch is None:  # only ties here: a pair that only joins the collectives
                batch = self._placeholder_pair(trajectories)
            held = len(batch) // 2
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.update)
            for dealt in deal_minibatches(
                counts, config.minibatch_size, epochs=config.epochs, generator=generator
            ):
                rows, placeholder = stand_in(dealt.rows)  # this rank's pairs of the minibatch
                weight = 0.0 if placeholder else 1.0
                sub = batch.select(torch.cat([rows, rows + held]))  # chosen rows, then their rejected rows
                step_shares, grad_norm = self._preference_step(
                    sub, dealt.size, weight=weight, temperature=config.temperature
                )
                self.optimizer_steps += 1
                for key, value in step_shares.items():
                    shares.setdefault(key, []).append(value)
                grad_norms.append(grad_norm)
        with warnings.catch_warnings():  # an update of ties only steps the schedule, not the optimizer
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.update += 1
        stats = self._episode_stats(trajectories, n, {k: float(np.mean(v)) for k, v in shares.items()})
        self.ties += int(stats["ties"])
        self.sampled_tokens += int(stats.pop("tokens"))
        if grad_norms:  # the same on every rank (the gradients are averaged before clipping)
            stats["grad_norm"] = float(np.mean(grad_norms))
        stats.update(
            sampled_tokens=float(self.sampled_tokens),
            optimizer_steps=float(self.optimizer_steps),
            learning_rate=float(self.scheduler.get_last_lr()[0]),
            update_seconds=time.perf_counter() - start_time,
        )
        return stats

    def _placeholder_pair(self, trajectories: Trajectories) -> SequenceBatch:
        """Episodes 0 and 1 (one prompt) as a pair, for a rank whose pairs all tie to join the collectives."""
        responses, masks = trajectories.conversation_list()
        return pair_batch(
            [trajectories.prompt_ids[0]],
            [responses[0]],
            [responses[1]],
            pad_id=self.pad_id,
            device=self.device,
            chosen_masks=masks[:1] if trajectories.multi_turn else None,
            rejected_masks=masks[1:2] if trajectories.multi_turn else None,
        )

    def _episode_stats(
        self, trajectories: Trajectories, pairs: int, loss_shares: dict[str, float]
    ) -> dict[str, float]:
        """Pairs, ties, scores, KL and lengths over every rank's episodes, and the loss statistics (each
        rank's shares of the minibatch means, added up), in one collective."""
        scores = trajectories.scores.reshape(-1, 2)
        kl = trajectories.kl[np.isfinite(trajectories.kl)]
        sums = all_reduce_sums(
            {
                "pairs": pairs,
                "prompts": len(scores),
                "score": float(scores.sum()),
                "chosen": float(scores.max(axis=1).sum()),
                "rejected": float(scores.min(axis=1).sum()),
                "kl": float(kl.sum()),
                "kl_count": len(kl),
                "tokens": float(trajectories.lengths.sum()),
                **{f"loss/{key}": value for key, value in loss_shares.items()},
            },
            self.device,
        )
        prompts = sums["prompts"]
        stats = {
            "pairs": sums["pairs"],
            "ties": prompts - sums["pairs"],
            "score": sums["score"] / (2 * prompts),
            "chosen_score": sums["chosen"] / prompts,
            "rejected_score": sums["rejected"] / prompts,
            "kl": sums["kl"] / sums["kl_count"] if sums["kl_count"] else float("nan"),
            "response_length": sums["tokens"] / (2 * prompts),
            "tokens": sums["tokens"],
        }
        stats.update({key[5:]: value for key, value in sums.items() if key.startswith("loss/")})
        return stats

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
        """Run updates until ``total_updates`` are done or ``total_tokens`` response tokens have been sampled
        (whichever comes first; continuing from :attr:`update` after a resume).

        Update u draws ``prompts_per_update`` prompts (without replacement when the environment has enough)
        from a generator seeded by ``(seed, u)``, and seeds
        the environment's reset, sampling and minibatch order from ``(seed, u)`` too, so a resumed run
        continues exactly as the uninterrupted one. Returns the per-update diagnostics (score, chosen and rejected scores, ties,
        loss, implicit-reward accuracy and margin, KL to the reference, sampled tokens).

        On N processes every rank calls it with its own environment (:meth:`make_env` shards the prompts) and
        draws ``prompts_per_update / N`` of its prompts with its own seeds
        (:func:`llm_env.distributed.rank_seed`); the token budget counts every rank's tokens, so all ranks stop
        after the same update, and only rank 0 writes TensorBoard logs, the progress bar and checkpoints.
        """
        config = self.config
        if total_updates is None and total_tokens is None:
            raise ValueError("give total_updates, total_tokens or both")
        total = int(total_updates) if total_updates is not None else None
        if total is None and config.lr_schedule != "constant":
            raise ValueError(
                f"lr_schedule={config.lr_schedule!r} decays over total_updates: give total_updates, or use "
                "lr_schedule='constant' with a token budget alone"
            )
        self.sampler.attach(env)
        self.scheduler = make_scheduler(
            self.optimizer,
            config.lr_schedule,
            total_steps=total if total is not None else 1,
            warmup_steps=config.warmup_updates,
            completed_steps=self.update,
        )
        main = is_main_process()
        writer = tensorboard_writer(config.log_dir) if main else None
        history = []
        bar = tqdm(
            total=total_tokens if total is None else total,
            initial=self.sampled_tokens if total is None else self.update,
            desc="online dpo",
            unit=" tokens" if total is None else " updates",
            disable=not config.progress or not main,
        )
        while (total is None or self.update < total) and (
            total_tokens is None or self.sampled_tokens < total_tokens
        ):
            rng = np.random.default_rng((rank_seed(config.seed), self.update))
            n_prompts = env.num_prompts  # with fewer prompts than asked for, some are drawn twice
            count = config.prompts_per_update // self.world_size  # this rank's share
            prompts = rng.choice(n_prompts, size=count, replace=count > n_prompts)
            start = time.perf_counter()
            with full_parameters(self.policy):  # FSDP2: every rank decodes at its own pace
                trajectories = self.sample(
                    env, prompts, seed=rank_seed(config.seed * 1_000_003 + self.update)
                )
            rollout_time = time.perf_counter() - start
            before = self.sampled_tokens
            stats = self.learn(trajectories)
            tokens = self.sampled_tokens - before  # every rank's
            stats.update(update=self.update, rollout_tokens_per_s=tokens / max(rollout_time, 1e-9))
            history.append(stats)
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(f"online_dpo/{key}", value, self.update)
            done = (total is not None and self.update >= total) or (
                total_tokens is not None and self.sampled_tokens >= total_tokens
            )
            if checkpoint_dir is not None and (self.update % checkpoint_every == 0 or done):
                self.save_checkpoint(checkpoint_dir)
            if callback is not None:  # after the checkpoint: a callback that stops the run loses nothing
                callback(self.update, stats)
            bar.update(1 if total is not None else tokens)
            bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.3f}", ties=int(stats["ties"]))
        bar.close()
        if writer is not None:
            writer.close()
        return history

    # -------------------------------------------------------------------------------- checkpointing
    def _counters(self) -> dict[str, Any]:
        return {
            "update": self.update,
            "sampled_tokens": self.sampled_tokens,
            "ties": self.ties,
            "optimizer_steps": self.optimizer_steps,
        }

    def _restore_counters(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])
        self.sampled_tokens = int(state["sampled_tokens"])
        self.ties = int(state["ties"])
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
