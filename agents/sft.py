"""Supervised fine-tuning: maximise log p(response | prompt), the loss on response tokens only.

Used for the SFT phase (Ouyang et al. 2022, step 1), by rejection sampling (Llama 2 fine-tunes on the
best of k samples) and, as a plain language-modelling loss, by PPO-ptx.

On N processes (``torchrun``, :mod:`llm_env.distributed`) every rank passes the same examples; each batch
is dealt round-robin across the ranks, the loss is normalised by the batch's response tokens over all
ranks and the gradients are averaged (DDP) or reduce-scattered (FSDP2), so training equals the
single-process run on the same data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from agents.losses import masked_mean
from agents.policy import SequenceBatch, add_lora, response_forward
from llm_env.distributed import (
    Strategy,
    all_reduce_sum,
    data_parallel,
    init_distributed,
    is_main_process,
    rank,
    world_size,
)
from llm_env.models import model_device, pad_token_id
from llm_env.prompts import read_jsonl
from llm_env.training import make_optimizer, make_scheduler, trainable_parameters

__all__ = ["SFTConfig", "load_sft_data", "sft_loss", "sft_train", "tokenize_pairs"]


@dataclass
class SFTConfig:
    """Options of :func:`sft_train`."""

    learning_rate: float = 1e-4
    """AdamW learning rate."""
    epochs: int = 1
    """Passes over the data."""
    batch_size: int = 8
    """Examples per optimizer step."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warmup."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up linearly."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank instead of all weights (0: full fine-tuning)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    add_eos: bool = True
    """Append the EOS token to text responses, so the model learns to stop."""
    seed: int = 0
    """Seed of the example order."""
    progress: bool = True
    """Show a progress bar."""
    strategy: Strategy = "ddp"
    """On several processes: "ddp" (a replica per rank, gradients averaged) or "fsdp" (parameters,
    gradients and optimizer state sharded with FSDP2; the returned model stays sharded). Ignored in one
    process."""

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")


def load_sft_data(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, response) pairs from a JSONL file; errors name the line and the field."""
    pairs = []
    for line, obj in read_jsonl(path):
        for key in ("prompt", "response"):
            if key not in obj:
                raise ValueError(f"{os.fspath(path)}:{line}: missing field {key!r}")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise ValueError(f"{os.fspath(path)}:{line}: field {key!r} must be a non-empty string")
        pairs.append((obj["prompt"], obj["response"]))
    if not pairs:
        raise ValueError(f"{os.fspath(path)} contains no examples")
    return pairs


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    add_eos: bool = True,
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids as the environment tokenizes them, response ids without special tokens (+ EOS)."""
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token")
        response_ids = [[*ids, tokenizer.eos_token_id] for ids in response_ids]
    return prompt_ids, response_ids


def sft_loss(model: nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the response tokens (prompt tokens carry no loss)."""
    return -masked_mean(response_forward(model, batch).logprobs, batch.response_mask)


def sft_train(
    model: nn.Module,
    examples: Sequence[tuple[Any, ...]],
    config: SFTConfig | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune ``model`` on (prompt, response) examples; returns the model and metrics.

    Examples are text pairs (then ``tokenizer`` is required) or token-id pairs (lists, arrays, tensors),
    the form rejection sampling produces. A token-id example may carry a third element, a boolean mask over
    its response (or None): a conversation, whose replies are context and whose agent tokens alone are
    learnt (:meth:`agents.policy.SequenceBatch.build`). With ``config.lora_rank > 0`` the returned model is a peft model.
    On N processes every rank calls it with the same examples (see the module docstring); the metrics are
    global.
    """
    config = config or SFTConfig()
    init_distributed()
    if not examples:
        raise ValueError("no SFT examples")
    agent_masks = None
    if isinstance(examples[0][0], str):
        if tokenizer is None:
            raise ValueError("text examples need tokenizer=...")
        prompt_ids, response_ids = tokenize_pairs(
            tokenizer, [p for p, _ in examples], [r for _, r in examples], add_eos=config.add_eos
        )
    else:
        prompt_ids, response_ids = [e[0] for e in examples], [e[1] for e in examples]
        masks = [e[2] if len(e) > 2 else None for e in examples]
        if any(m is not None for m in masks):
            agent_masks = masks
    if config.lora_rank:
        model = add_lora(model, rank=config.lora_rank, alpha=config.lora_alpha)
    device = model_device(model)
    pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    data = SequenceBatch.build(prompt_ids, response_ids, pad_id=pad, device=device, agent_masks=agent_masks)
    trainer = data_parallel(model, strategy=config.strategy)  # the model itself in one process
    optimizer = make_optimizer(
        trainable_parameters(model),
        lr=config.learning_rate,
        betas=(0.9, 0.999),
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = -(-len(data) // config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = make_scheduler(
        optimizer, config.lr_schedule, total_steps=total, warmup_steps=int(config.warmup_ratio * total)
    )
    generator = torch.Generator().manual_seed(config.seed)
    tokens = data.response_mask.sum(dim=1).cpu().numpy().astype(np.float64)  # response tokens per example
    world, me = world_size(), rank()
    losses: list[float] = []
    epoch_losses: list[float] = []
    was_training = model.training
    model.train()
    bar = tqdm(total=total, desc="sft", disable=not config.progress or not is_main_process(), leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).numpy()
        epoch = []
        for start in range(0, len(data), config.batch_size):
            batch = order[start : start + config.batch_size]
            mine = batch[me::world]  # this rank's share of the batch
            weight = 1.0
            if len(mine) == 0:  # fewer examples than ranks: join the collective with a zero-weight example
                mine, weight = batch[:1], 0.0
            sub = data.select(mine)
            logprobs = response_forward(trainer, sub).logprobs
            token_sum = -(logprobs * sub.response_mask.to(logprobs.dtype)).sum()  # summed NLL of the share
            # The mean NLL over the whole batch's tokens: DDP averages over ranks, hence the world size.
            loss = token_sum * weight / (tokens[batch].sum() / world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            epoch.append(float(all_reduce_sum(token_sum.detach() * weight)) / tokens[batch].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{epoch[-1]:.3f}")
        losses += epoch
        epoch_losses.append(float(np.mean(epoch)))
    bar.close()
    model.train(was_training)
    return model, {"loss": losses, "epoch_loss": epoch_losses, "examples": len(data), "steps": total}
