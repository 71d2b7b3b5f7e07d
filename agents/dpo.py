"""Offline DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on preference pairs.

Direct preference optimisation fits the policy to comparisons without a reward model and without sampling.
For a prompt x with a chosen response y_w and a rejected one y_l, let h be the difference of the policy's
log-ratios to the frozen reference,

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].

DPO minimises ``-log sigmoid(beta * h)``: the Bradley-Terry likelihood of the preference under the implicit
reward ``beta * log(pi / ref)`` (Rafailov et al. 2023, eq. 7), whose minimiser is the KL-regularised RLHF
optimum with KL coefficient beta. IPO minimises ``(h - 1/(2 beta))^2`` (Azar et al. 2023, eq. 17): it regresses
h to a fixed margin instead of pushing it to infinity on preferences that are never contradicted, so beta
keeps regularising even on deterministic data.

Log-probabilities are summed over response tokens, the sequence probability ``pi(y|x)`` both papers write.
``average_logprobs=True`` averages them instead, as TRL does for ``loss_type="ipo"`` (TRL PR 1265, on the IPO
authors' advice, so that IPO's fixed margin does not depend on the response length); the papers' formulas
sum, so the default does. The reference log-probabilities are computed once per batch without gradients:
with LoRA by the policy's own base with the adapter disabled (no second copy of the weights), without it by
a frozen copy of the initial policy. Dropout stays off in both (TRL's ``disable_dropout``), so h is exactly 0
before the first step.

On N processes (``torchrun --nproc-per-node N``, see :mod:`llm_env.distributed`) every rank reads the same
pairs in the same order and takes its share of each batch (pairs ``rank, rank + N, ...`` of it); the loss of
a share is summed over its pairs and divided by the batch's pair count, and DDP (or FSDP2) adds the shares'
gradients up, so each step is the single-process step on the same batch. Rank 0 writes logs, TensorBoard and
checkpoints.

Reading order: :func:`dpo_loss` (the loss, checked by hand in the tests), :class:`DPOConfig`,
:func:`load_preference_pairs`, :meth:`DPOAgent.learn` (one optimizer step), :meth:`DPOAgent.train` (the
loop). :mod:`agents.online_dpo` reuses the loss, the batch layout and the reference handling.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.checkpoint import load_training_state, save_training_state
from agents.policy import SequenceBatch, TokenSampler, add_lora, load_policy, response_forward, save_policy
from agents.sft import tokenize_pairs
from agents.tracking import jsonable, scalar, tensorboard_writer
from llm_env import TokenActions
from llm_env.distributed import (
    Strategy,
    all_reduce_sums,
    data_parallel,
    init_distributed,
    is_main_process,
    rank,
    world_size,
)
from llm_env.models import load_causal_lm, pad_token_id, unwrap_model
from llm_env.prompts import read_jsonl
from llm_env.training import make_optimizer, make_scheduler, trainable_parameters

__all__ = [
    "DPOAgent",
    "DPOConfig",
    "PreferencePairs",
    "dpo_loss",
    "frozen_reference",
    "load_preference_pairs",
    "pair_batch",
    "preference_loss",
    "reference_model",
    "sequence_logprobs",
    "tokenize_preference_pairs",
]

LossType = Literal["dpo", "ipo"]


# ------------------------------------------------------------------------------------------ the loss
def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: LossType = "dpo",
    num_pairs: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO or IPO loss of N preference pairs from their sequence log-probabilities, each of shape (N,).

    ``h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)``; DPO:
    ``mean(-log sigmoid(beta * h))``, IPO: ``mean((h - 1 / (2 beta))^2)``. Returns the loss and detached
    diagnostics: the implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected responses, their
    margin (``beta * h``) and the share of pairs where the chosen one has the larger implicit reward.

    ``num_pairs`` replaces N as the divisor of the loss and of the diagnostics: the pair count of the whole
    batch when these N pairs are one rank's share of it, so that the ranks' values add up to the batch's.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen = policy_chosen - reference_chosen  # (N,) log-ratio of the chosen responses
    rejected = policy_rejected - reference_rejected  # (N,)
    h = chosen - rejected
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * h)  # Rafailov et al. 2023, eq. 7
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2  # Azar et al. 2023, eq. 17 (tau = beta)
    else:
        raise ValueError(f"loss_type must be 'dpo' or 'ipo', got {loss_type!r}")
    stats = {
        "chosen_reward": _pair_mean((beta * chosen).detach(), num_pairs),
        "rejected_reward": _pair_mean((beta * rejected).detach(), num_pairs),
        "reward_margin": _pair_mean((beta * h).detach(), num_pairs),
        "reward_accuracy": _pair_mean((h.detach() > 0).float(), num_pairs),
    }
    return _pair_mean(losses, num_pairs), stats


def _pair_mean(values: torch.Tensor, num_pairs: float | None) -> torch.Tensor:
    """The mean of per-pair ``values``, or their sum over ``num_pairs`` (a rank's share of a batch's mean)."""
    return values.mean() if num_pairs is None else values.sum() / num_pairs


def sequence_logprobs(
    model: nn.Module, batch: SequenceBatch, *, average: bool = False, temperature: float = 1.0
) -> torch.Tensor:
    """``log pi(y|x)`` of every row of ``batch``, (N,): summed over response tokens, or averaged."""
    logprobs = response_forward(model, batch, temperature=temperature).logprobs  # (N, T), padding 0
    total = logprobs.sum(dim=1)
    return total / batch.response_mask.sum(dim=1) if average else total


def pair_batch(
    prompt_ids: Sequence[Any],
    chosen_ids: Sequence[Any],
    rejected_ids: Sequence[Any],
    *,
    pad_id: int,
    device: torch.device | str,
    chosen_masks: Sequence[Any] | None = None,
    rejected_masks: Sequence[Any] | None = None,
) -> SequenceBatch:
    """N pairs as one :class:`SequenceBatch` of 2N rows: the chosen responses, then the rejected ones, so that
    one forward pass scores both halves. With masks (conversations, see :meth:`SequenceBatch.build`) only the
    agent's tokens of each are scored."""
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(
            f"need one chosen and one rejected response per prompt, got {len(prompt_ids)} prompts, "
            f"{len(chosen_ids)} chosen and {len(rejected_ids)} rejected"
        )
    prompts = list(prompt_ids)
    masks = None
    if chosen_masks is not None or rejected_masks is not None:
        masks = [*(chosen_masks or [None] * len(prompts)), *(rejected_masks or [None] * len(prompts))]
    return SequenceBatch.build(
        prompts + prompts, [*chosen_ids, *rejected_ids], pad_id=pad_id, device=device, agent_masks=masks
    )


@contextlib.contextmanager
def reference_model(policy: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference to score with: ``reference``, or (None) the LoRA ``policy`` with its adapter disabled."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


def frozen_reference(
    policy: nn.Module, reference: nn.Module | str | os.PathLike | None, *, lora: bool, device: torch.device
) -> nn.Module | None:
    """The reference of a DPO agent: the given model (or path), None for the adapter-disabled LoRA base, or a
    frozen copy of the initial policy."""
    if reference is not None:
        model = (
            load_causal_lm(reference, device=device)
            if isinstance(reference, (str, os.PathLike))
            else reference
        )
        return model.eval().requires_grad_(False)
    return None if lora else copy.deepcopy(policy).eval().requires_grad_(False)


def preference_loss(
    policy: nn.Module,
    reference: nn.Module | None,
    batch: SequenceBatch,
    *,
    beta: float,
    loss_type: LossType,
    average: bool,
    temperature: float = 1.0,
    num_pairs: float | None = None,
    trainer: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`dpo_loss` of a :func:`pair_batch`: one reference pass without gradients, one policy pass.

    ``num_pairs``: the divisor of the loss and diagnostics (see :func:`dpo_loss`); ``trainer``: what the
    policy pass calls (a ``DistributedDataParallel`` wrapper of ``policy``; default ``policy``), while the
    LoRA reference is ``policy`` itself with its adapter disabled."""
    n = len(batch) // 2
    with torch.no_grad(), reference_model(policy, reference) as ref:
        ref_logps = sequence_logprobs(ref, batch, average=average, temperature=temperature)
    logps = sequence_logprobs(trainer or policy, batch, average=average, temperature=temperature)
    loss, stats = dpo_loss(
        logps[:n],
        logps[n:],
        ref_logps[:n],
        ref_logps[n:],
        beta=beta,
        loss_type=loss_type,
        num_pairs=num_pairs,
    )
    stats["chosen_logp"] = _pair_mean(logps[:n].detach(), num_pairs)
    stats["rejected_logp"] = _pair_mean(logps[n:].detach(), num_pairs)
    return loss, stats


# ---------------------------------------------------------------------------------------- the config
@dataclass
class DPOConfig:
    """Options of :class:`DPOAgent`. Defaults follow TRL's ``DPOConfig`` where it has the field."""

    loss_type: LossType = "dpo"
    """dpo: -log sigmoid(beta h) (Rafailov et al. 2023); ipo: (h - 1/(2 beta))^2 (Azar et al. 2023)."""
    beta: float = 0.1
    """KL strength: DPO's inverse temperature, IPO's tau (smaller: further from the reference)."""
    average_logprobs: bool = False
    """Average log-probabilities over response tokens instead of summing them (TRL does so for IPO so that
    its margin 1/(2 beta) does not depend on length; both papers sum)."""
    learning_rate: float = 1e-6
    """AdamW learning rate (TRL's default, for 7B models; tiny models need ~1e-4)."""
    epochs: int = 1
    """Passes over the preference pairs."""
    batch_size: int = 8
    """Pairs per optimizer step (2 x batch_size sequences per forward pass)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate schedule over the optimizer steps, after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up linearly."""
    add_eos: bool = True
    """Append the EOS token to every response, so that the policy also learns where answers end."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank; the reference is then the base with adapters disabled (0: full)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Modules that receive LoRA adapters."""
    temperature: float = 1.0
    """Sampling temperature when the trained agent acts in an environment (training samples nothing)."""
    strategy: Strategy = "ddp"
    """On several processes (torchrun): "ddp" keeps a replica of the policy per rank and averages gradients;
    "fsdp" shards parameters, gradients and optimizer state across ranks (FSDP2). Ignored in one process."""
    seed: int = 0
    """Seed of the pair order and of sampling."""
    log_dir: str | None = None
    """Write TensorBoard logs here."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.loss_type in ("dpo", "ipo"), f"loss_type must be 'dpo' or 'ipo', got {self.loss_type!r}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta} (typical: 0.1 for DPO)")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        check(self.lora_rank >= 0, f"lora_rank must be >= 0 (0 disables LoRA), got {self.lora_rank}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(self.strategy in ("ddp", "fsdp"), f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)

    def check_world_size(self, world: int) -> None:
        """Fail before any work when a batch cannot give each of ``world`` ranks a pair."""
        if self.batch_size < world:
            raise ValueError(
                f"batch_size={self.batch_size} pairs cannot give each of the {world} ranks a pair per step: use "
                f"a batch_size of at least {world}"
            )


# ------------------------------------------------------------------------------------------ the data
def _check_text(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: {what} is empty")
    return value


def _text(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"{where}: missing field {key!r} (fields present: {sorted(row)})")
    return _check_text(row[key], f"field {key!r}", where)


def _row_pairs(row: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    prompt = _text(row, "prompt", where)
    if row.get("responses") is not None:  # a K-way ranking, best first: its K(K-1)/2 ordered pairs
        ranked = row["responses"]
        if isinstance(ranked, str) or not isinstance(ranked, Sequence) or len(ranked) < 2:
            raise ValueError(f"{where}: field 'responses' must be a list of at least 2 strings, best first")
        texts = [_check_text(r, f"field 'responses' item {i}", where) for i, r in enumerate(ranked)]
        pairs = [(prompt, texts[i], texts[j]) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    else:
        pairs = [(prompt, _text(row, "chosen", where), _text(row, "rejected", where))]
    for _, chosen, rejected in pairs:
        if chosen == rejected:
            raise ValueError(f"{where}: the chosen and rejected responses are identical; a pair needs two")
    return pairs


def load_preference_pairs(
    *sources: str | os.PathLike | Sequence[tuple[str, str, str]],
) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from preference JSONL files or from lists of triples.

    Files have the format :func:`rewards.save_preferences` writes (``prompt``, ``chosen``, ``rejected``; a
    ``level`` or ``margin`` is ignored); a ranking row (``responses``, best first) gives all its ordered
    pairs. Errors name ``file:line`` (or ``pair i``) and the field. Texts are used verbatim: the response
    is appended to the prompt as the environment does, so responses start with their separator.
    """
    pairs: list[tuple[str, str, str]] = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            for line, row in read_jsonl(path):
                pairs += _row_pairs(row, f"{path}:{line}")
            if not pairs:
                raise ValueError(f"{path} contains no preference pairs")
            continue
        for i, triple in enumerate(source):
            if not isinstance(triple, (tuple, list)) or len(triple) != 3:
                raise ValueError(f"pair {i}: expected a (prompt, chosen, rejected) triple, got {triple!r}")
            pairs += _row_pairs(dict(zip(("prompt", "chosen", "rejected"), triple)), f"pair {i}")
    if not pairs:
        raise ValueError("no preference pairs given")
    return pairs


@dataclass(frozen=True)
class PreferencePairs:
    """Tokenized pairs: prompt ids as the environment tokenizes them, response ids (+ EOS)."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def key(self) -> str:
        """A short hash of the token ids, to refuse resuming a run on other data."""
        ids = [self.prompt_ids, self.chosen_ids, self.rejected_ids]
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]


def tokenize_preference_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str, str]],
    *,
    add_eos: bool = True,
    max_length: int | None = None,
) -> PreferencePairs:
    """Tokenize (prompt, chosen, rejected) triples like SFT tokenizes (prompt, response) pairs; a sequence
    longer than ``max_length`` (the model's context) is an error naming the pair."""
    prompts = [p for p, _, _ in pairs]
    prompt_ids, chosen_ids = tokenize_pairs(tokenizer, prompts, [c for _, c, _ in pairs], add_eos=add_eos)
    _, rejected_ids = tokenize_pairs(tokenizer, prompts, [r for _, _, r in pairs], add_eos=add_eos)
    for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids)):
        if not p or not c or not r:
            raise ValueError(f"pair {i}: the prompt or a response tokenizes to nothing")
        longest = len(p) + max(len(c), len(r))
        if max_length is not None and longest > max_length:
            raise ValueError(
                f"pair {i}: {longest} tokens (prompt {len(p)} + response {max(len(c), len(r))}) exceed the "
                f"model's context of {max_length}; shorten or drop it"
            )
    return PreferencePairs(prompt_ids, chosen_ids, rejected_ids)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model accepts (its position embeddings), when its config says so."""
    config = unwrap_model(model).config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# ----------------------------------------------------------------------------------------- the agent
class PreferencePolicy:
    """What offline and online DPO set up alike: the policy (with LoRA adapters when ``lora_rank > 0``), its
    tokenizer and device, the frozen reference, the data-parallel trainer, AdamW and the learning-rate
    schedule (made constant here and rebuilt for the run's length by ``train``), the seeded sampler it acts
    with; and the checkpoints, which
    differ only in the counters each agent saves (:meth:`_counters`)."""

    def _setup_policy(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
        config: Any,
        reference: nn.Module | str | os.PathLike | None,
        device: torch.device | str | None,
    ) -> None:
        init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
        self.world_size = world_size()
        config.check_world_size(self.world_size)
        model, self.tokenizer, self.device = load_policy(policy, tokenizer, device)
        if config.lora_rank:  # peft freezes the base weights; only the adapters train
            model = add_lora(
                model,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
            )
        self.policy = model
        self.reference = frozen_reference(model, reference, lora=bool(config.lora_rank), device=self.device)
        """The frozen reference model, or None: the LoRA policy with its adapter disabled."""
        self._trainer = data_parallel(model, strategy=config.strategy)  # the policy itself in one process
        self.optimizer = make_optimizer(
            trainable_parameters(model),
            lr=config.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=config.weight_decay,
        )
        self.scheduler = make_scheduler(self.optimizer, "constant", total_steps=1)
        self.pad_id = pad_token_id(self.tokenizer)
        self._generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = TokenSampler(self.policy, temperature=config.temperature, generator=self._generator)
        """The acting half: samples with the policy's KV cache (seeded with ``config.seed``)."""

    def _preference_step(
        self, batch: SequenceBatch, num_pairs: int, *, weight: float, temperature: float = 1.0
    ) -> tuple[dict[str, float], float]:
        """One optimizer step of offline and online DPO alike on this rank's pairs ``batch`` (chosen rows,
        then their rejected rows) of a minibatch of ``num_pairs`` pairs over all ranks: the preference loss,
        this rank's share of its gradient, clipping and the step. ``weight`` 0 makes a rank without pairs in
        the minibatch join the gradient collective with a stand-in pair that counts for nothing;
        ``temperature`` is the behaviour policy's (online DPO scores its own samples at the temperature it
        drew them with). Returns this rank's weighted shares of the loss statistics (summed over the ranks
        they give the minibatch's means) and the gradient norm (the same on every rank: the gradients are
        averaged before clipping)."""
        config = self.config
        loss, stats = preference_loss(
            self.policy,
            self.reference,
            batch,
            beta=config.beta,
            loss_type=config.loss_type,
            average=config.average_logprobs,
            temperature=temperature,
            num_pairs=num_pairs,
            trainer=self._trainer,
        )
        self.optimizer.zero_grad(set_to_none=True)
        # This rank's share of the minibatch's loss; DDP (or FSDP2) averages the ranks' gradients, hence N x.
        (loss * (weight * self.world_size)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.policy), config.max_grad_norm)
        self.optimizer.step()
        shares = {key: scalar(value) * weight for key, value in {"loss": loss, **stats}.items()}
        return shares, scalar(grad_norm)

    def _counters(self) -> dict[str, Any]:
        """The agent's progress, saved in the checkpoint (its resume point)."""
        raise NotImplementedError

    def _restore_counters(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_checkpoint(self, path: str | os.PathLike) -> Path:
        """Policy (adapters only with LoRA), optimizer, scheduler, RNG states, the agent's counters and config,
        atomically (on N processes every rank calls it and rank 0 writes)."""
        return save_training_state(
            path,
            modules={"policy": self.policy},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state={**self._counters(), "config": jsonable(dataclasses.asdict(self.config))},
            trainable_only=bool(self.config.lora_rank),
            optimizer_model=self._trainer,
        )

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` into this agent (same model source)."""
        self.scheduler = make_scheduler(self.optimizer, self.config.lr_schedule, total_steps=1)
        state = load_training_state(
            path,
            modules={"policy": self.policy},
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            optimizer_model=self._trainer,
        )
        self._restore_counters(state)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the policy as a plain transformers model (LoRA merged) with its tokenizer (on N processes every
        rank calls it and rank 0 writes)."""
        save_policy(self.policy, self.tokenizer, path)


class DPOAgent(PreferencePolicy):
    """Offline DPO / IPO on preference pairs; acts like any policy in a :class:`~llm_env.TextGenVectorEnv`.

    Args:
        policy: the SFT model to optimise (a causal LM object, or a path / hub name).
        tokenizer: its tokenizer (default: loaded from ``policy`` when that is a path).
        config: :class:`DPOConfig`.
        reference: the frozen reference; default: the policy's base with LoRA adapters disabled when
            ``lora_rank > 0``, otherwise a frozen copy of the initial policy.
        device: where the policy lives (default: the model's device, or CUDA when available for paths).
    """

    def __init__(
        self,
        policy: nn.Module | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        config: DPOConfig | None = None,
        *,
        reference: nn.Module | str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config = config or DPOConfig()
        self._setup_policy(policy, tokenizer, config, reference, device)
        self.step = 0
        """Optimizer steps taken (the resume point)."""
        self._data_key: str | None = None

    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Sample the next tokens with the policy's KV cache; report their log-probabilities."""
        return self.sampler.act(obs, restarted)

    def tokenize(
        self, pairs: str | os.PathLike | Sequence[tuple[str, str, str]] | PreferencePairs
    ) -> PreferencePairs:
        """Validate and tokenize (prompt, chosen, rejected) triples or a preference JSONL file (already
        tokenized pairs pass through)."""
        if isinstance(pairs, PreferencePairs):
            return pairs
        return tokenize_preference_pairs(
            self.tokenizer,
            load_preference_pairs(pairs),
            add_eos=self.config.add_eos,
            max_length=context_length(self.policy),
        )

    # ------------------------------------------------------------------------------------ learning
    def learn(self, batch: SequenceBatch, *, num_pairs: int | None = None) -> dict[str, float]:
        """One optimizer step on a :func:`pair_batch` (chosen rows first, then rejected rows).

        On N processes every rank calls it with its share of the step's pairs; ``num_pairs`` is the step's
        pair count over all ranks (default: counted with one collective), the divisor of the loss, so the
        step is the single-process step on every rank's pairs. The returned statistics are global.
        """
        if num_pairs is None:
            num_pairs = int(all_reduce_sums({"pairs": len(batch) // 2}, self.device)["pairs"])
        return self._step(batch, num_pairs, weight=1.0)

    def _step(self, batch: SequenceBatch, num_pairs: int, *, weight: float) -> dict[str, float]:
        """One optimizer step on this rank's pairs ``batch`` of a step of ``num_pairs`` pairs, then the
        schedule's step and the batch's means summed over the ranks."""
        self.policy.eval()  # no dropout: h is exactly 0 before the first step
        shares, grad_norm = self._preference_step(batch, num_pairs, weight=weight)
        self.scheduler.step()
        self.step += 1
        out = all_reduce_sums(shares, self.device)  # the shares add up to the batch's means
        out["grad_norm"] = grad_norm
        return out

    def _batch(self, data: PreferencePairs, index: np.ndarray) -> SequenceBatch:
        return pair_batch(
            [data.prompt_ids[i] for i in index],
            [data.chosen_ids[i] for i in index],
            [data.rejected_ids[i] for i in index],
            pad_id=self.pad_id,
            device=self.device,
        )

    def train(
        self,
        pairs: str | os.PathLike | Sequence[tuple[str, str, str]] | PreferencePairs,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        callback: Callable[[int, dict[str, float]], None] | None = None,
    ) -> list[dict[str, float]]:
        """``epochs`` passes over ``pairs`` in minibatches of ``batch_size`` (continuing from :attr:`step`
        after a resume); returns the per-step diagnostics.

        The pair order of epoch e is a permutation seeded by ``(seed, e)``, so a run resumed from a
        checkpoint takes exactly the steps the uninterrupted run would have taken. A checkpoint is written
        every ``checkpoint_every`` steps and at the end; ``callback(step, stats)`` runs after it.

        On N processes every rank calls it with the same pairs and takes its share of each batch (pairs
        ``rank, rank + N, ...``; a rank left without a pair of a last, short batch joins with a pair that
        counts for nothing), so the steps are those of one process on the same data in the same order.
        """
        config = self.config
        data = self.tokenize(pairs)
        key = data.key()
        if self._data_key is not None and self._data_key != key:
            raise ValueError(
                "the checkpoint was trained on other preference pairs: resume with the same data"
            )
        self._data_key = key
        n = len(data)
        per_epoch = -(-n // config.batch_size)
        total = per_epoch * config.epochs
        self.scheduler = make_scheduler(
            self.optimizer,
            config.lr_schedule,
            total_steps=total,
            warmup_steps=int(config.warmup_ratio * total),
            completed_steps=self.step,
        )
        main = is_main_process()
        writer = tensorboard_writer(config.log_dir) if main else None
        history = []
        bar = tqdm(
            total=total, initial=self.step, desc=config.loss_type, disable=not config.progress or not main
        )
        order, order_epoch = None, -1
        while self.step < total:
            epoch, position = divmod(self.step, per_epoch)
            if epoch != order_epoch:  # a pure function of (seed, epoch): resumable mid-epoch
                order = np.random.default_rng((config.seed, epoch)).permutation(n)
                order_epoch = epoch
            index = order[position * config.batch_size : (position + 1) * config.batch_size]
            mine, weight = index[rank() :: self.world_size], 1.0  # this rank's share of the batch
            if len(mine) == 0:  # a short last batch: join the gradient collective with a pair of no weight
                mine, weight = index[:1], 0.0
            start = time.perf_counter()
            stats = self._step(self._batch(data, mine), len(index), weight=weight)
            stats.update(
                step=self.step,
                epoch=epoch,
                learning_rate=float(self.scheduler.get_last_lr()[0]),
                seconds=time.perf_counter() - start,
            )
            history.append(stats)
            if writer is not None:
                for name, value in stats.items():
                    writer.add_scalar(f"{config.loss_type}/{name}", value, self.step)
            if checkpoint_dir is not None and (self.step % checkpoint_every == 0 or self.step == total):
                self.save_checkpoint(checkpoint_dir)
            if callback is not None:  # after the checkpoint: a callback that stops the run loses nothing
                callback(self.step, stats)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['reward_accuracy']:.2f}")
        bar.close()
        if writer is not None:
            writer.close()
        return history

    # -------------------------------------------------------------------------------- checkpointing
    def _counters(self) -> dict[str, Any]:
        return {"step": self.step, "data": self._data_key}

    def _restore_counters(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._data_key = state["data"]
