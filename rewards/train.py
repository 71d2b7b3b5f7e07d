"""Training and evaluating a reward model on preference data.

The recipe follows Llama 2's reward-model training (Touvron et al. 2023, section 3.2.2): AdamW, a cosine
learning-rate schedule that decays to 10% of the peak after a warmup of 3% of the steps, gradient
clipping at 1.0, and the margin loss when the data has preference levels. K-way rankings are trained as
InstructGPT does (Ouyang et al. 2022): all pairs of one prompt in one batch element, each response encoded
once. Evaluation reports pairwise accuracy overall and per preference level (it should rise with the
strength of the preference, Llama 2 Table 8) and the mean score gap.

On N processes (``torchrun``, :mod:`llm_env.distributed`) every rank loads the same data; each batch of
comparisons is dealt round-robin across the ranks, the loss is the mean over the whole batch's comparisons
and the gradients are averaged by DDP, so training equals the single-process run. Every rank evaluates on
all the held-out comparisons (the metrics are those of the whole set) and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_env.distributed import (
    all_reduce_sum,
    data_parallel,
    init_distributed,
    is_main_process,
    rank,
    world_size,
)
from llm_env.models import resolve_device
from llm_env.reward import check_scores
from llm_env.training import make_optimizer, make_scheduler
from rewards.data import Comparison, PreferenceSource, load_preferences, split_by_prompt
from rewards.losses import LEVELS, MARGIN_TABLES, comparison_loss, ranking_pairs
from rewards.model import RewardModel, ScoreStats, load_reward_model

__all__ = [
    "ComparisonBatch",
    "RewardTrainingConfig",
    "TrainResult",
    "collate_comparisons",
    "evaluate_reward_model",
    "train_reward_model",
]

RANKING = "ranking"
"""Per-level key of the pairs that come from K-way rankings."""
UNLABELED = "unlabeled"
"""Per-level key of the pairs without a level."""


@dataclass
class RewardTrainingConfig:
    """Hyperparameters of :func:`train_reward_model`; defaults follow Llama 2's reward models."""

    epochs: int = 1
    """Passes over the training data (Llama 2 trains one epoch: more overfits)."""
    batch_size: int = 32
    """Comparisons (pairs or rankings) per optimizer step."""
    lr: float = 1e-5
    """Peak learning rate (Llama 2: 1e-5, 5e-6 for 70B)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (Llama 2)."""
    eps: float = 1e-5
    """AdamW epsilon (Llama 2)."""
    warmup_ratio: float = 0.03
    """Fraction of the steps with a linear warmup (Llama 2: 3%)."""
    min_warmup_steps: int = 5
    """At least this many warmup steps (capped at the number of steps)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to this fraction of ``lr`` (Llama 2: 10%)."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping threshold; None disables clipping."""
    margin_table: str = field(default="small", metadata={"choices": (*MARGIN_TABLES, "none")})
    """Margins for pairs with a level: ``"small"`` (1, 2/3, 1/3, 0), ``"large"`` (3, 2, 1, 0) or ``"none"``
    (plain Bradley-Terry). A pair's explicit ``margin`` is always used."""
    center_coef: float = 0.0
    """Reward-centering penalty coefficient (Eisenstein et al. 2023 use 0.01); 0 disables it."""
    eval_fraction: float = 0.1
    """Fraction of the prompts held out for evaluation (ignored when eval data is given)."""
    eval_every: int = 0
    """Evaluate every this many steps as well as after each epoch; 0: after each epoch only."""
    seed: int = 0
    """Seeds the split, the shuffling, the new head / LoRA initialisation and dropout."""
    max_length: int | None = None
    """Token budget per text (longer texts keep their end); None: the model's position limit."""
    lora_rank: int = 0
    """LoRA rank; 0 trains all weights. The adapter is merged into the weights after training."""
    lora_alpha: float | None = None
    """LoRA alpha (default ``2 * lora_rank``)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_target_modules: tuple[str, ...] | None = None
    """Modules LoRA adapts (default: peft's choice for the architecture)."""
    checkpoint_dir: str | None = None
    """Save a checkpoint here after each epoch (``epoch-N``) and every ``checkpoint_every`` steps."""
    checkpoint_every: int = 0
    """Also checkpoint every this many steps (``step-N``); needs ``checkpoint_dir``."""
    score_batch_size: int = 64
    """Texts per forward pass in evaluation and calibration."""
    device: str = "auto"
    """Device to train on: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (where a model object is; a path loads
    to CUDA when available)."""
    dtype: str | None = None
    """dtype to load a model given as a path in (default: the checkpoint's); float32 trains most stably."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}")
        if self.margin_table not in (*MARGIN_TABLES, "none"):
            raise ValueError(f"margin_table must be 'small', 'large' or 'none', got {self.margin_table!r}")
        if self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0, got {self.center_coef}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(
                f"eval_fraction must be in [0, 1), got {self.eval_fraction}; use 0 to train on all the data"
            )
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 trains all weights), got {self.lora_rank}")
        if self.lora_rank == 0 and (
            self.lora_alpha is not None or self.lora_dropout or self.lora_target_modules is not None
        ):
            raise ValueError(
                "lora_alpha, lora_dropout and lora_target_modules only apply with LoRA: set lora_rank > 0 "
                "or leave them at their defaults"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.min_warmup_steps < 0:
            raise ValueError(f"min_warmup_steps must be >= 0, got {self.min_warmup_steps}")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError("checkpoint_every and eval_every must be >= 0 (0 means once per epoch)")
        if self.checkpoint_every and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir: say where to write the checkpoints")
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(self.lora_target_modules)
        self.betas = (float(self.betas[0]), float(self.betas[1]))


@dataclass
class TrainResult:
    """What :func:`train_reward_model` returns."""

    model: RewardModel
    """The trained model (LoRA merged), with score statistics on the training data."""
    metrics: dict[str, Any]
    """``eval`` (:func:`evaluate_reward_model` on the held-out data, None without), ``train_loss``
    (mean loss of the last epoch), ``steps``, ``epochs``, ``seconds``, ``stats`` and ``config``."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per step (``step``, ``epoch``, ``loss``, ``lr``, ``grad_norm``) and per evaluation."""


class ComparisonBatch(NamedTuple):
    """A batch of comparisons: every response once, and the pairs between them."""

    input_ids: torch.Tensor  # (N, T) right-padded prompt + response tokens
    attention_mask: torch.Tensor  # (N, T)
    better: torch.Tensor  # (P,) row of the preferred response of each pair
    worse: torch.Tensor  # (P,) row of the other response
    margin: torch.Tensor  # (P,) float32
    group: torch.Tensor  # (P,) comparison index of each pair, in [0, G)


def pair_margin(comparison: Comparison, table: str) -> float:
    """Margin of a comparison's pairs: its explicit margin, else its level's in ``table``, else 0."""
    if comparison.margin is not None:
        return comparison.margin
    if comparison.level is not None and table != "none":
        return MARGIN_TABLES[table][comparison.level]
    return 0.0


def collate_comparisons(
    encoded: Sequence[Sequence[Sequence[int]]], margins: Sequence[float], pad_id: int
) -> ComparisonBatch:
    """Build a batch from token ids: ``encoded[g]`` holds the ids of comparison ``g``'s responses, best first.

    Every response is one row, so a K-way ranking is encoded once for its ``K choose 2`` pairs.
    """
    rows = [ids for comparison in encoded for ids in comparison]
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = torch.as_tensor(ids)
        attention_mask[r, : len(ids)] = 1
    better, worse, margin, group = [], [], [], []
    offset = 0
    for g, comparison in enumerate(encoded):
        i, j = ranking_pairs(len(comparison))
        better.append(i + offset)
        worse.append(j + offset)
        margin.append(torch.full((len(i),), float(margins[g])))
        group.append(torch.full((len(i),), g, dtype=torch.long))
        offset += len(comparison)
    return ComparisonBatch(
        input_ids, attention_mask, torch.cat(better), torch.cat(worse), torch.cat(margin), torch.cat(group)
    )


class _Scorer(nn.Module):
    """``rm.forward_ids`` as a module owning ``rm.model``, so that DDP can wrap what the training step calls."""

    def __init__(self, rm: RewardModel) -> None:
        super().__init__()
        self.model = rm.model
        self.rm = rm  # not an nn.Module: held, not registered

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.rm.forward_ids(input_ids, attention_mask)


def batch_loss(
    rm: RewardModel, batch: ComparisonBatch, center_coef: float = 0.0, *, scorer: nn.Module | None = None
) -> torch.Tensor:
    """The training loss of one batch (:func:`rewards.losses.comparison_loss` on the model's scores);
    ``scorer`` computes the scores instead of ``rm.forward_ids`` (a DDP wrapper)."""
    device = rm.device
    forward = scorer if scorer is not None else rm.forward_ids
    scores = forward(batch.input_ids.to(device), batch.attention_mask.to(device))  # (N,)
    better, worse = batch.better.to(device), batch.worse.to(device)
    return comparison_loss(
        scores[better],
        scores[worse],
        batch.group.to(device),
        batch.margin.to(device),
        center_coef=center_coef,
    )


def _pairs_of(comparisons: Sequence[Comparison]) -> tuple[list[int], list[int], list[str]]:
    """Flat indices (into the list of all responses) of every pair, and each pair's level key."""
    better, worse, levels, offset = [], [], [], 0
    for c in comparisons:
        i, j = ranking_pairs(len(c.responses))
        better += (i + offset).tolist()
        worse += (j + offset).tolist()
        key = c.level if c.is_pair and c.level is not None else (UNLABELED if c.is_pair else RANKING)
        levels += [key] * len(i)
        offset += len(c.responses)
    return better, worse, levels


@torch.no_grad()
def evaluate_reward_model(
    rm: RewardModel,
    data: PreferenceSource | Sequence[Comparison],
    *,
    margin_table: str = "none",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Pairwise accuracy and score gap of a reward model on comparisons.

    Every response is scored once; a K-way ranking contributes its ``K choose 2`` pairs. A pair counts as
    correct when the preferred response scores higher (a tie counts one half).

    Returns:
        ``accuracy``, ``mean_gap`` (mean of ``r_better - r_worse``), ``loss`` (the training loss with
        ``margin_table``), ``num_pairs``, and ``per_level``: for each level present, in the order
        significantly better ... negligibly better, then ``ranking`` and ``unlabeled``, a dict with
        ``accuracy``, ``mean_gap`` and ``count``.
    """
    comparisons = load_preferences(data)
    if batch_size is not None:
        old, rm.batch_size = rm.batch_size, batch_size
    try:
        prompts = [c.prompt for c in comparisons for _ in c.responses]
        responses = [r for c in comparisons for r in c.responses]
        scores = check_scores(rm.score(prompts, responses), len(responses), "the reward model").double().cpu()
    finally:
        if batch_size is not None:
            rm.batch_size = old
    better, worse, levels = _pairs_of(comparisons)
    gap = scores[better] - scores[worse]  # (P,)
    correct = (gap > 0).double() + 0.5 * (gap == 0).double()
    group = torch.tensor(
        [g for g, c in enumerate(comparisons) for _ in range(math.comb(len(c.responses), 2))]
    )
    margins = torch.tensor([pair_margin(c, margin_table) for c in comparisons], dtype=torch.float64)[group]
    loss = comparison_loss(scores[better], scores[worse], group, margins)
    per_level = {}
    level_array = np.array(levels)
    for key in (*LEVELS, RANKING, UNLABELED):
        mask = torch.from_numpy(level_array == key)
        if bool(mask.any()):
            per_level[key] = {
                "accuracy": float(correct[mask].mean()),
                "mean_gap": float(gap[mask].mean()),
                "count": int(mask.sum()),
            }
    return {
        "accuracy": float(correct.mean()),
        "mean_gap": float(gap.mean()),
        "loss": float(loss),
        "num_pairs": len(levels),
        "per_level": per_level,
    }


def _encode(rm: RewardModel, comparisons: Sequence[Comparison]) -> list[list[list[int]]]:
    """Token ids of every response of every comparison, in one tokenizer call."""
    prompts = [c.prompt for c in comparisons for _ in c.responses]
    responses = [r for c in comparisons for r in c.responses]
    flat = rm.encode(prompts, responses)
    out, start = [], 0
    for c in comparisons:
        out.append(flat[start : start + len(c.responses)])
        start += len(c.responses)
    for c, ids in zip(comparisons, out):
        if any(len(seq) == 0 for seq in ids):
            raise ValueError(f"{c.where}: a prompt + response tokenizes to zero tokens")
    return out


def _unique_texts(comparisons: Sequence[Comparison]) -> tuple[list[str], list[str]]:
    pairs = dict.fromkeys((c.prompt, r) for c in comparisons for r in c.responses)
    return [p for p, _ in pairs], [r for _, r in pairs]


def train_reward_model(
    model: RewardModel | PreTrainedModel | str | os.PathLike,
    data: PreferenceSource | Sequence[Comparison],
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
    eval_data: PreferenceSource | Sequence[Comparison] | None = None,
    config: RewardTrainingConfig | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a reward model on preference data and return it with its metrics.

    Args:
        model: a :class:`RewardModel`, a sequence-classification or causal LM object (with ``tokenizer``),
            or a path / hub name of either (a causal LM gets a new scalar head, as in Llama 2).
        data: a JSONL path, a ``datasets.Dataset``, rows, or :class:`Comparison` objects (see
            :mod:`rewards.data`).
        tokenizer: the model's tokenizer (default: loaded from the model's path).
        eval_data: held-out comparisons; default: ``config.eval_fraction`` of the prompts of ``data``.
        config: hyperparameters; ``overrides`` replace single fields (``epochs=3``).

    A :class:`RewardModel` passed in is trained in place (and returned). After training, the model's
    score statistics are measured on the distinct training texts, so
    ``score(..., whiten=True)`` and :class:`rewards.Llama2Reward` can whiten its scores.
    """
    config = RewardTrainingConfig(**{**(asdict(config) if config else {}), **overrides})
    init_distributed()  # under torchrun / accelerate launch; nothing in a plain process
    start_time = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    comparisons = load_preferences(data)
    if eval_data is not None:
        train_set, eval_set = comparisons, load_preferences(eval_data)
    else:
        train_set, eval_set = split_by_prompt(comparisons, config.eval_fraction, config.seed)

    rm = _prepare_model(model, tokenizer, config)
    encoded = _encode(rm, train_set)
    margins = [pair_margin(c, config.margin_table) for c in train_set]
    params = [p for p in rm.parameters() if p.requires_grad]
    total_steps = math.ceil(len(train_set) / config.batch_size) * config.epochs
    optimizer, scheduler = _optimizer(params, config, total_steps)

    scorer = data_parallel(_Scorer(rm))  # DDP on N processes; the plain scorer in one
    world, me, main = world_size(), rank(), is_main_process()
    history: list[dict[str, Any]] = []
    bar = tqdm(total=total_steps, desc="reward model", disable=not config.progress or not main, leave=False)
    step, epoch_losses = 0, []
    for epoch in range(1, config.epochs + 1):
        rm.train()
        order = rng.permutation(len(train_set))
        epoch_losses = []
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            mine, weight = idx[me::world], 1.0  # this rank's share of the batch
            if len(mine) == 0:  # fewer comparisons than ranks: join the collective with a zero weight
                mine, weight = idx[:1], 0.0
            batch = collate_comparisons([encoded[i] for i in mine], [margins[i] for i in mine], rm.pad_id)
            share = batch_loss(rm, batch, config.center_coef, scorer=scorer)  # mean over this rank's share
            # The mean over the whole batch's comparisons (DDP averages the gradients over the ranks).
            loss = share * (weight * len(mine) * world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = _clip(params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            value = float(all_reduce_sum(loss.detach() / world))
            epoch_losses.append(value)
            history.append({"step": step, "epoch": epoch, "loss": value, "lr": lr, "grad_norm": grad_norm})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", epoch=epoch)
            if config.eval_every and step % config.eval_every == 0 and eval_set:
                history.append({"step": step, "eval": _evaluate(rm, eval_set, config)})
            if config.checkpoint_every and step % config.checkpoint_every == 0 and main:
                _checkpoint(rm, train_set, config, f"step-{step}")
        if eval_set:
            history.append({"step": step, "epoch": epoch, "eval": _evaluate(rm, eval_set, config)})
            bar.set_postfix(loss=f"{np.mean(epoch_losses):.4f}", acc=f"{history[-1]['eval']['accuracy']:.3f}")
        if config.checkpoint_dir is not None and main:
            _checkpoint(rm, train_set, config, f"epoch-{epoch}")
    bar.close()

    rm.merge_lora().eval()
    stats = _calibrate(rm, train_set, config)
    eval_metrics = next((h["eval"] for h in reversed(history) if "eval" in h and h["step"] == step), None)
    if eval_set and eval_metrics is None:
        eval_metrics = _evaluate(rm, eval_set, config)
    metrics = {
        "eval": eval_metrics,
        "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
        "steps": step,
        "epochs": config.epochs,
        "num_train": len(train_set),
        "num_eval": len(eval_set),
        "seconds": time.perf_counter() - start_time,
        "stats": asdict(stats),
        "config": asdict(config),
    }
    return TrainResult(rm, metrics, history)


def _prepare_model(
    model: RewardModel | PreTrainedModel | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    config: RewardTrainingConfig,
) -> RewardModel:
    """Load (``config.device="auto"``: a path goes to CUDA when available, an object stays where it is),
    place, add LoRA."""
    is_path = isinstance(model, (str, os.PathLike))
    source = model.model if isinstance(model, RewardModel) else model
    device = resolve_device(config.device, source)
    rm = load_reward_model(model, tokenizer, device=device, dtype=config.dtype if is_path else None)
    rm.to(device)
    if config.max_length is not None:
        rm.max_length = config.max_length
    if config.lora_rank:
        rm.add_lora(
            config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    return rm


def _optimizer(
    params: list[nn.Parameter], config: RewardTrainingConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with Llama 2's schedule: warmup over 3% of the steps (at least 5), cosine decay to 10%."""
    optimizer = make_optimizer(
        params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    warmup = min(total_steps, max(config.min_warmup_steps, math.ceil(config.warmup_ratio * total_steps)))
    scheduler = make_scheduler(
        optimizer, "cosine", total_steps=total_steps, warmup_steps=warmup, min_ratio=config.min_lr_ratio
    )
    return optimizer, scheduler


def _clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    if max_norm is None:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _evaluate(
    rm: RewardModel, eval_set: Sequence[Comparison], config: RewardTrainingConfig
) -> dict[str, Any]:
    return evaluate_reward_model(
        rm, eval_set, margin_table=config.margin_table, batch_size=config.score_batch_size
    )


def _calibrate(rm: RewardModel, train_set: Sequence[Comparison], config: RewardTrainingConfig) -> ScoreStats:
    old, rm.batch_size = rm.batch_size, config.score_batch_size
    try:
        return rm.calibrate(*_unique_texts(train_set))
    finally:
        rm.batch_size = old


def _checkpoint(
    rm: RewardModel, train_set: Sequence[Comparison], config: RewardTrainingConfig, name: str
) -> None:
    """Save a servable checkpoint (with score statistics; scoring restores the training mode)."""
    _calibrate(rm, train_set, config)
    rm.save_pretrained(os.path.join(config.checkpoint_dir, name), metadata={"config": asdict(config)})
