"""Rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, section 3.2.3).

Each round samples ``k`` responses per prompt from the current policy through the environment, keeps the
one the reward model scores highest, adds it to a pool and fine-tunes the policy on the pool with the SFT
loss. Llama 2 pooled the best samples of all earlier rounds ("accumulate"); "latest" keeps only the
current round's. Compared with PPO it explores more per prompt (k samples instead of one) and is a
simple supervised update.

Best-of-k is also a policy in its own right, whose KL from the sampling policy is known in closed form
when the reward has no ties: ``KL(pi_bok || pi) = log k - (k - 1) / k`` (Stiennon et al. 2020, appendix;
Gao et al. 2022). :func:`best_of_k_kl` measures it from samples, so each round reports the measured value
next to the theory.

On N processes (``torchrun``, :mod:`llm_env.distributed`) every rank holds the same environment (all the
prompts); the round's prompts are chosen as in one process and dealt round-robin across the ranks, each
rank samples its prompts and picks their winners, and the winners are gathered and put back in prompt
order, so the pool holds the same entries in the same order as in one process. Fine-tuning on the pool
is itself data-parallel (:func:`~agents.sft.sft_train`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.checkpoint import load_training_state, save_training_state
from agents.policy import TokenSampler, add_lora, load_policy, save_policy
from agents.rollout import collect_episodes
from agents.sft import SFTConfig, sft_train
from llm_env import TextGenVectorEnv, TokenActions
from llm_env.distributed import (
    all_gather_objects,
    full_parameters,
    init_distributed,
    is_main_process,
    rank,
    rank_seed,
    world_size,
)

__all__ = ["RejectionSamplingAgent", "RejectionSamplingConfig", "best_of_k_kl", "best_of_k_kl_theory"]


def best_of_k_kl_theory(k: int) -> float:
    """``log k - (k - 1) / k``: KL of the best-of-k policy from the sampling policy (no reward ties)."""
    return math.log(k) - (k - 1) / k


def best_of_k_kl(scores: np.ndarray, k: int) -> float:
    """Estimate ``KL(best-of-k || pi)`` from ``scores`` of shape (prompts, m * k) sampled from pi.

    Best-of-k (ties broken at random) reweights each response y by ``(F(r)^k - F(r-)^k) / (F(r) - F(r-))``,
    with F the CDF of the reward under pi and F(r-) its left limit; for a continuous reward this is
    ``k F(r)^(k-1)``, whose log has mean ``log k - (k - 1) / k`` (the theory). The KL is the mean log
    weight over best-of-k winners. The samples of each prompt are split into m groups of k and each
    group's winner is placed among all n = m * k samples of its prompt:

    * an untied winner of rank R contributes ``log k + (k - 1) * E[log U_(R)]``, with
      ``E[log U_(R)] = psi(R) - psi(n + 1) = -sum_{j=R}^{n} 1/j`` the exact mean log of the R-th of n
      uniform order statistics, which avoids the bias of plugging in F = R / n;
    * a tied winner contributes the plug-in ``log((F^k - F_-^k) / (F - F_-))`` with the empirical CDFs,
      which is 0 when every sample ties (best-of-k then is the sampling policy).

    Needs m >= 2.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or k < 1 or scores.shape[1] % k or scores.shape[1] < 2 * k:
        raise ValueError(f"scores must have shape (prompts, m * k) with m >= 2, got {scores.shape} for k={k}")
    n = scores.shape[1]
    tail = np.cumsum(1.0 / np.arange(n, 0, -1))[::-1]  # tail[R - 1] = sum_{j=R}^{n} 1/j
    terms = []
    for row in scores:
        for group in row.reshape(-1, k):
            best = group.max()
            below, equal = int(np.sum(row < best)), int(np.sum(row == best))
            if equal == 1:
                terms.append(math.log(k) - (k - 1) * float(tail[below]))
            else:
                upper, lower = (below + equal) / n, below / n
                terms.append(math.log((upper**k - lower**k) / (upper - lower)))
    return float(np.mean(terms))


@dataclass
class RejectionSamplingConfig:
    """Options of :class:`RejectionSamplingAgent`."""

    k: int = 4
    """Responses sampled per prompt; the best by reward-model score is kept."""
    temperature: float = 1.0
    """Sampling temperature (Llama 2 raised it over the rounds)."""
    rounds: int = 1
    """Rounds of sample -> select -> fine-tune in :meth:`RejectionSamplingAgent.train`."""
    prompts_per_round: int | None = None
    """Prompts sampled per round (None: every prompt of the environment, in order)."""
    pool: Literal["accumulate", "latest"] = "accumulate"
    """Fine-tune on the best samples of all rounds so far (Llama 2) or of the latest round only."""
    kl_groups: int = 4
    """Groups of k samples per prompt drawn to measure the best-of-k KL (>= 2 to measure; 1 disables it).
    The extra groups are drawn for ``kl_prompts`` prompts only and never used for selection."""
    kl_prompts: int = 16
    """Prompts used for the KL measurement."""
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(learning_rate=1e-5, epochs=1, progress=False))
    """How the policy is fine-tuned on the pool each round."""
    lora_rank: int = 0
    """Fine-tune LoRA adapters of this rank instead of all weights (0: full)."""
    seed: int = 0
    """Seed of prompt choice and sampling."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.sft, dict):
            self.sft = SFTConfig(**self.sft)
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.pool not in ("accumulate", "latest"):
            raise ValueError(f"pool must be 'accumulate' or 'latest', got {self.pool!r}")
        if self.kl_groups < 1 or self.kl_prompts < 0:
            raise ValueError("kl_groups must be >= 1 and kl_prompts >= 0")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError("prompts_per_round must be >= 1 or None")
        if self.sft.lora_rank:
            raise ValueError("set lora_rank on RejectionSamplingConfig, not on its sft config")


class RejectionSamplingAgent:
    """Best-of-k rejection sampling with SFT on the winners, acting through the Gym API.

    Args:
        policy: the model to sample from and fine-tune (object, path or hub name).
        tokenizer: its tokenizer (default: from ``policy`` when that is a path).
        config: :class:`RejectionSamplingConfig`.
        device: where the policy lives.
    """

    def __init__(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: RejectionSamplingConfig | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config = config or RejectionSamplingConfig()
        init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
        if config.prompts_per_round is not None and config.prompts_per_round < world_size():
            raise ValueError(
                f"prompts_per_round={config.prompts_per_round} cannot give each of the {world_size()} ranks a "
                f"prompt: use at least {world_size()}"
            )
        model, self.tokenizer, self.device = load_policy(policy, tokenizer, device)
        if config.lora_rank:
            model = add_lora(model, rank=config.lora_rank)
        self.policy = model
        self.pool: list[dict[str, Any]] = []
        self.round = 0
        self.sampled_tokens = 0
        """Response tokens sampled so far by every rank, the KL-measurement draws included."""
        self.optimizer_steps = 0
        """Fine-tuning (gradient) steps taken so far, over all rounds."""
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = TokenSampler(self.policy, temperature=config.temperature, generator=self._generator)

    def make_env(
        self, prompts: Any, reward: Any, *, num_envs: int = 16, **env_kwargs: Any
    ) -> TextGenVectorEnv:
        """A :class:`~llm_env.TextGenVectorEnv` (autoreset disabled, so prompts can be forced) on this
        agent's tokenizer and device. Pass ``reference=`` to also measure the KL to a reference."""
        options = dict(
            prompts=prompts,
            reward=reward,
            tokenizer=self.tokenizer,
            device=self.device,
            autoreset_mode=AutoresetMode.DISABLED,
        )
        options.update(env_kwargs)
        return TextGenVectorEnv(num_envs=num_envs, **options)

    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Sample with the policy's KV cache at the configured temperature."""
        self.sampler.model = self.policy  # fine-tuning may have returned a new module
        return self.sampler.act(obs, restarted)

    def sample(self, env: TextGenVectorEnv, prompt_indices: np.ndarray, k: int, *, seed: int) -> Any:
        """k responses for each prompt (episodes ordered prompt by prompt)."""
        self.policy.eval()
        self._generator.manual_seed(seed)
        queue = np.repeat(np.asarray(prompt_indices, dtype=np.int64), k)
        with full_parameters(self.policy):  # FSDP2 (sft.strategy="fsdp"): decode at each rank's own pace
            return collect_episodes(env, self, len(queue), seed=seed, prompt_indices=queue)

    def _sample_shares(self, env: TextGenVectorEnv, prompts: np.ndarray, k: int, *, seed: int) -> Any:
        """k responses for each of ``prompts``, the prompts dealt round-robin across the ranks.

        Returns this rank's draws and the positions (in ``prompts``) of the prompts it sampled; in one
        process, all of them with ``seed``.
        """
        positions = np.arange(len(prompts))[rank() :: world_size()]
        if len(positions) == 0:  # fewer prompts than ranks: nothing to sample here
            return None, positions
        return self.sample(env, prompts[positions], k, seed=rank_seed(seed)), positions

    def run_round(self, env: TextGenVectorEnv) -> dict[str, float]:
        """One round: sample k per prompt, keep the best, grow the pool, fine-tune on it."""
        config = self.config
        if env.metadata["autoreset_mode"] != AutoresetMode.DISABLED:
            raise ValueError("rejection sampling forces prompts: build the env with autoreset_mode=DISABLED")
        seed = config.seed * 1_000_003 + self.round
        rng = np.random.default_rng(seed)
        n_prompts = env.num_prompts
        if config.prompts_per_round is None:
            prompts = np.arange(n_prompts)
        else:
            prompts = rng.choice(n_prompts, size=min(config.prompts_per_round, n_prompts), replace=False)
        if len(prompts) < world_size():
            raise ValueError(
                f"{len(prompts)} prompts per round cannot give each of the {world_size()} ranks a prompt"
            )
        start = time.perf_counter()
        # Episode i * k + j of a rank's draws: its i-th prompt, draw j.
        draws, positions = self._sample_shares(env, prompts, config.k, seed=seed)
        elapsed = time.perf_counter() - start
        local_scores = draws.scores.reshape(len(positions), config.k)
        winners = local_scores.argmax(axis=1)
        responses, agent_masks = draws.conversation_list()  # conversations: the agent's tokens are learnt
        local_best = []
        for i, position in enumerate(positions):
            episode = i * config.k + int(winners[i])
            local_best.append(
                {
                    "prompt_index": int(prompts[position]),
                    "prompt": draws.prompts[episode],
                    "response": draws.responses[episode],
                    "response_ids": responses[episode].tolist(),
                    **(
                        {"agent_mask": agent_masks[episode].tolist()}
                        if agent_masks[episode] is not None
                        else {}
                    ),
                    "score": float(local_scores[i, winners[i]]),
                    "round": self.round,
                }
            )
        # Every rank's winners, scores and KLs, put back in the order of the round's prompts.
        shares = all_gather_objects(
            (positions, local_best, local_scores, draws.kl, int(draws.lengths.sum()), elapsed)
        )
        best: list[dict[str, Any]] = [{}] * len(prompts)
        scores = np.zeros((len(prompts), config.k))
        kl = np.zeros((len(prompts), config.k))
        for share_positions, share_best, share_scores, share_kl, _, _ in shares:
            for position, item in zip(share_positions, share_best):
                best[position] = item
            scores[share_positions] = share_scores
            kl[share_positions] = np.asarray(share_kl).reshape(len(share_positions), config.k)
        tokens = sum(share[4] for share in shares)
        elapsed = max(share[5] for share in shares)
        kl_measured = None
        measured_tokens = 0  # sampled for the KL measurement only
        if config.kl_groups >= 2 and config.kl_prompts:
            # More draws for a few prompts, only to measure the best-of-k KL (not used for selection).
            rows = min(config.kl_prompts, len(prompts))
            extra, extra_positions = self._sample_shares(
                env, prompts[:rows], config.k * (config.kl_groups - 1), seed=seed + 1
            )
            extra_scores = np.zeros((rows, config.k * (config.kl_groups - 1)))
            local = extra.scores.reshape(len(extra_positions), -1) if extra is not None else extra_scores[:0]
            extra_tokens = int(extra.lengths.sum()) if extra is not None else 0
            for share_positions, share_scores, share_tokens in all_gather_objects(
                (extra_positions, local, extra_tokens)
            ):
                extra_scores[share_positions] = share_scores
                measured_tokens += share_tokens
            pooled = np.concatenate([scores[:rows], extra_scores], axis=1)
            kl_measured = best_of_k_kl(pooled, config.k)
        self.pool = [*self.pool, *best] if config.pool == "accumulate" else best
        examples = [
            (env.prompt_token_ids(item["prompt_index"]), item["response_ids"], item.get("agent_mask"))
            for item in self.pool
        ]
        sft = dataclasses.replace(config.sft, seed=config.sft.seed + self.round)
        self.policy, sft_metrics = sft_train(self.policy, examples, sft)
        self.policy.eval()
        self.round += 1
        self.sampled_tokens += tokens + measured_tokens
        self.optimizer_steps += int(sft_metrics["steps"])
        stats = {
            "round": float(self.round),
            "sample_score": float(scores.mean()),
            "best_score": float(scores.max(axis=1).mean()),
            "pool_size": float(len(self.pool)),
            "sft_loss": float(sft_metrics["epoch_loss"][-1]),
            "kl_best_of_k_theory": best_of_k_kl_theory(config.k),
            "sample_tokens_per_s": tokens / max(elapsed, 1e-9),
            "sampled_tokens": float(self.sampled_tokens),
            "optimizer_steps": float(self.optimizer_steps),
        }
        if kl_measured is not None:
            stats["kl_best_of_k_measured"] = kl_measured
        if np.isfinite(kl).any():
            stats["kl_to_reference"] = float(np.nanmean(kl))
        return stats

    def train(
        self, env: TextGenVectorEnv, *, checkpoint_dir: str | os.PathLike | None = None
    ) -> list[dict[str, float]]:
        """Run the configured number of rounds (continuing after a resume); returns per-round stats."""
        history = []
        bar = tqdm(
            total=self.config.rounds,
            initial=self.round,
            desc="rejection sampling",
            disable=not self.config.progress or not is_main_process(),
        )
        while self.round < self.config.rounds:
            stats = self.run_round(env)
            history.append(stats)
            if checkpoint_dir is not None:
                self.save_checkpoint(checkpoint_dir)
            bar.update(1)
            bar.set_postfix(best=f"{stats['best_score']:.3f}", mean=f"{stats['sample_score']:.3f}")
        bar.close()
        return history

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Policy weights, pool, round counter and RNG states, written atomically (on N processes every
        rank calls it and rank 0 writes)."""
        return save_training_state(
            path,
            modules={"policy": self.policy},
            state={
                "round": self.round,
                "sampled_tokens": self.sampled_tokens,
                "optimizer_steps": self.optimizer_steps,
                "pool": self.pool,
                "config": json.loads(json.dumps(dataclasses.asdict(self.config), default=str)),
            },
            trainable_only=bool(self.config.lora_rank),
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (same model source)."""
        state = load_training_state(path, modules={"policy": self.policy})
        self.round = int(state["round"])
        self.sampled_tokens = int(state.get("sampled_tokens", 0))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.pool = list(state["pool"])

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the policy as a plain transformers model (LoRA merged) with its tokenizer."""
        save_policy(self.policy, self.tokenizer, path)
