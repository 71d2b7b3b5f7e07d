"""Data-parallel RLHF on ``torch.distributed``: the few pieces every trainer needs to run on N processes.

The environment splits cleanly across processes: each process (rank) owns its own
:class:`~llm_env.TextGenVectorEnv`, with its own reference and reward model, steps it on a disjoint shard of
the prompts and computes rewards and KL locally. Only gradients and a few statistics cross processes:

* **launch**: ``torchrun --nproc-per-node N`` (multi-node through its rendezvous) or ``accelerate launch``
  set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``; :func:`init_distributed` reads them (the
  trainers call it themselves, so a script needs no change) and starts a process group: gloo for CPU
  tensors, NCCL for CUDA ones, with a timeout so that a collective whose peer never comes errors out;
* **data**: :func:`shard_prompts` gives each rank a disjoint, seeded share of the prompts and
  :func:`rank_seed` decorrelates the ranks' sampling (rank 0 keeps the single-process seeds);
  :func:`deal_minibatches` deals the minibatches of an update by one global order of every rank's
  examples, so that each minibatch is the one a single process holding them all would use;
* **the model**: :func:`data_parallel` wraps it in ``DistributedDataParallel`` (gradients averaged over
  ranks) or shards it with FSDP2 ``fully_shard`` (parameters, gradients and optimizer state split across
  ranks); :func:`full_parameters` gathers a sharded model's weights for a rollout, :func:`gradient_sync`
  skips the gradient reduction of accumulation micro-batches, :func:`full_state_dict` gathers weights for
  saving;
* **statistics**: :func:`global_masked_mean` / :func:`global_masked_var` / :func:`global_masked_whiten`
  reduce over the tokens of every rank (advantage whitening must use the global mean and variance, not
  the mean of per-rank statistics), :func:`all_reduce_sum`, :func:`all_reduce_sums`,
  :func:`all_reduce_means` and :func:`all_gather_objects` move the rest.

Every helper is a no-op in a single process (the results are then bit for bit those of the local
formulas), so the same code runs on a laptop and on many GPUs. Applying this to a trainer takes a few
lines: shard the prompts, wrap the model, make the statistics that define the update global, and write
logs and checkpoints on rank 0 (:func:`is_main_process`).

Failures: torchrun stops every worker as soon as one exits with an error (``max_restarts=0``), and every
collective times out after ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`, or ``$LLM_ENV_DIST_TIMEOUT``
seconds), so a rank that raises or hangs never leaves the others waiting forever.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llm_env.models import model_device
from llm_env.prompts import PromptSource, load_prompts

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RANK_SEED_STRIDE",
    "Minibatch",
    "Strategy",
    "all_counts",
    "all_gather_objects",
    "all_reduce_means",
    "all_reduce_sum",
    "all_reduce_sums",
    "barrier",
    "check_divisible",
    "data_parallel",
    "deal_minibatches",
    "full_parameters",
    "full_state_dict",
    "global_masked_mean",
    "global_masked_var",
    "global_masked_whiten",
    "gradient_sync",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "launched",
    "local_rank",
    "rank",
    "rank_seed",
    "shard_prompts",
    "shutdown_distributed",
    "stand_in",
    "unwrap_parallel",
    "world_size",
]

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks before it raises (``$LLM_ENV_DIST_TIMEOUT`` overrides)."""

RANK_SEED_STRIDE = (1 << 32) + 0x9E3779B1
"""Distance between the seeds of consecutive ranks (:func:`rank_seed`): larger than any per-update offset, and
different modulo 2**32 for every rank up to 2**32 (its low half, 0x9E3779B1, is odd). The low half matters:
torch's CPU generator keeps only a seed's low 32 bits, so with a stride of exactly 2**32 every rank sampled
rank 0's tokens on CPU."""

Strategy = Literal["ddp", "fsdp"]
"""How a trainer wraps its model across ranks: ``DistributedDataParallel`` or ``FullyShardedDataParallel``."""


# ------------------------------------------------------------------------------------------ the group
def launched() -> bool:
    """Whether this process was started by a distributed launcher (torchrun, ``accelerate launch``)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_distributed() -> bool:
    """Whether a process group is running (even with one process, as under ``torchrun --nproc-per-node 1``)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its machine (``$LOCAL_RANK``; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0: the process that writes logs, TensorBoard, checkpoints and reports."""
    return rank() == 0


def init_distributed(*, backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Start the process group when launched by torchrun or ``accelerate launch``; return whether one runs.

    Does nothing (and returns False) in a plain ``python`` process, and nothing more when a group already
    exists, so every trainer calls it first. On a machine with CUDA each process binds to the GPU
    ``$LOCAL_RANK`` (so ``device="auto"`` and ``"cuda"`` mean this process's own GPU) and the group uses
    NCCL for CUDA tensors and gloo for CPU tensors; without CUDA it uses gloo.

    Args:
        backend: force a backend (``"gloo"``, ``"nccl"``, ``"cpu:gloo,cuda:nccl"``).
        timeout_s: how long a collective waits for the other ranks before raising (default
            ``$LLM_ENV_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`). Rollouts of different lengths make
            ranks wait for each other at the next collective, so keep it above the longest rollout.
    """
    if is_distributed():
        return True
    if not launched():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("LLM_ENV_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    kwargs: dict[str, Any] = {}
    if (
        torch.cuda.is_available() and local_rank() < torch.cuda.device_count()
    ):  # more ranks than GPUs: CPU runs
        torch.cuda.set_device(local_rank())
        backend = backend or "cpu:gloo,cuda:nccl"
        if "nccl" in backend:
            kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(backend=backend or "gloo", timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


def shutdown_distributed() -> None:
    """Wait for every rank, then destroy the process group (call it at the end of a successful run)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if is_distributed():
        dist.barrier()


# ------------------------------------------------------------------------------------------ the data
def rank_seed(seed: int, of_rank: int | None = None) -> int:
    """This rank's version of ``seed`` (or rank ``of_rank``'s): ``seed + rank * RANK_SEED_STRIDE``.

    Rank 0 keeps ``seed``, so a run in one process draws exactly what it drew before; the other ranks draw
    independent streams (sampling, environment resets) instead of repeating rank 0's, on CPU too (see
    :data:`RANK_SEED_STRIDE`).
    """
    return int(seed) + (rank() if of_rank is None else int(of_rank)) * RANK_SEED_STRIDE


def check_divisible(name: str, value: int, world: int | None = None, hint: str = "") -> int:
    """``value // world`` (default: the world size), or a ValueError naming the numbers when ``world`` does
    not divide ``value``, e.g. ``episodes_per_update=6 is not divisible by the world size 4``."""
    world = world_size() if world is None else int(world)
    if value % world:
        raise ValueError(
            f"{name}={value} is not divisible by the world size {world}" + (f": {hint}" if hint else "")
        )
    return value // world


def shard_prompts(
    prompts: PromptSource, *, num_envs: int = 1, seed: int = 0, key: str = "prompt"
) -> PromptSource | list[str]:
    """This rank's disjoint share of ``prompts`` (a path, a list, any prompt source); ``prompts`` itself in
    one process.

    The prompts are dealt round-robin from a permutation seeded with ``seed`` (so every rank computes the
    same deal without communicating) and each share keeps the order of the source. Every rank must be able
    to fill its ``num_envs`` sub-environments with prompts of its own, else a ValueError names the numbers
    before any work starts.
    """
    world = world_size()
    if world == 1:
        return prompts
    texts = load_prompts(prompts, key=key)
    if len(texts) < world * num_envs:
        raise ValueError(
            f"{len(texts)} prompts cannot give {world} ranks x {num_envs} envs a disjoint shard each: use at "
            f"least {world * num_envs} prompts, or fewer sub-environments per rank"
        )
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in np.sort(order[rank() :: world])]


@dataclass(frozen=True)
class Minibatch:
    """One minibatch of :func:`deal_minibatches`, as one rank sees it."""

    rows: torch.Tensor
    """This rank's rows of the minibatch (indices into its own examples), in the order of the global permutation."""
    size: int
    """Rows of the minibatch over every rank (what a mean over its examples divides by)."""
    counts: tuple[int, ...]
    """How many of them each rank holds, in rank order."""

    def micro_batches(self, max_rows: int) -> list[torch.Tensor]:
        """This rank's rows in consecutive micro-batches of at most ``max_rows``, as many on every rank.

        The ranks hold different numbers of rows of a minibatch, but each forward and backward pass is a
        collective (DDP's gradient reduction, FSDP2's gathers): the rank holding the most rows sets the count,
        and the others end with empty micro-batches, where they run a pass that carries no loss. At least one
        micro-batch, even for a minibatch without rows.
        """
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        steps = max(1, *(-(-count // max_rows) for count in self.counts))
        return [self.rows[i * max_rows : (i + 1) * max_rows] for i in range(steps)]


def stand_in(rows: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``rows`` (this rank's part of a minibatch or micro-batch) and False; or, when the rank holds none of
    it, one row (index 0) to run the pass on and True: every forward and backward pass is a collective, so the
    rank still runs one, and the caller must make that row's loss count for nothing."""
    if len(rows):
        return rows, False
    return torch.zeros(1, dtype=torch.long, device=rows.device), True


def deal_minibatches(
    counts: Sequence[int],
    minibatch_size: int | None,
    *,
    epochs: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    for_rank: int | None = None,
) -> list[Minibatch]:
    """The minibatches of ``epochs`` passes over examples spread over the ranks, dealt by one global order.

    Rank ``r`` holds ``counts[r]`` examples; they are numbered as if one process held every rank's in rank
    order (rank ``r``'s row ``i`` is example ``sum(counts[:r]) + i``). Each epoch draws one permutation of all
    of them from ``generator`` (on the CPU) and cuts it into minibatches of ``minibatch_size`` (None: one
    minibatch per epoch; the last one may be smaller), and every rank keeps the rows it holds. With the same
    generator state on every rank, minibatch ``k`` of all ranks together is exactly minibatch ``k`` of one
    process holding every example, and one process (``counts == [n]``) draws what ``torch.randperm(n)`` cut
    into minibatches gives. Shuffling each rank's share on its own would instead put ``minibatch_size / N``
    examples of every rank in each minibatch, a different update as soon as there are several per epoch.
    Without any example, each epoch is one empty minibatch (the ranks still step together). No collective:
    every rank computes the whole deal.

    Args:
        counts: every rank's number of examples, in rank order (e.g. from :func:`all_counts`).
        minibatch_size: examples per minibatch over all ranks.
        epochs: passes over the examples, one permutation each.
        generator: the seeded generator of the permutations, in the same state on every rank.
        device: where the returned row indices live (default: the CPU).
        for_rank: whose rows to return (default: this process's rank).
    """
    counts = [int(c) for c in counts]
    me = rank() if for_rank is None else int(for_rank)
    if not 0 <= me < len(counts) or min(counts, default=0) < 0:
        raise ValueError(f"need a non-negative count for every rank including rank {me}, got {counts}")
    if minibatch_size is not None and minibatch_size < 1:
        raise ValueError(f"minibatch_size must be >= 1 or None, got {minibatch_size}")
    total = sum(counts)
    size = max(1, total if minibatch_size is None else min(int(minibatch_size), total))
    bounds = np.cumsum([0, *counts])  # rank r holds examples [bounds[r], bounds[r + 1])
    out = []
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, max(total, 1), size):
            chunk = order[start : start + size]
            owners = np.searchsorted(bounds, chunk.numpy(), side="right") - 1  # the rank holding each example
            mine = chunk[torch.from_numpy(owners == me)] - int(bounds[me])
            out.append(
                Minibatch(
                    rows=mine.to(device) if device is not None else mine,
                    size=len(chunk),
                    counts=tuple(np.bincount(owners, minlength=len(counts)).tolist()),
                )
            )
    return out


# ----------------------------------------------------------------------------------- the collectives
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged in one process)."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_sums(values: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The sum over ranks of every value (one collective for all of them, in float64); the values in one
    process. Every rank must pass the same keys."""
    if not (is_distributed() and world_size() > 1) or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    all_reduce_sum(stacked)
    return dict(zip(keys, stacked.tolist()))


def all_reduce_means(values: Mapping[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The mean over ranks of every value (one collective for all of them); the values in one process."""
    if not (is_distributed() and world_size() > 1) or not values:
        return dict(values)
    return {k: v / world_size() for k, v in all_reduce_sums(values, device).items()}


def all_counts(count: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``count`` (e.g. of its examples), in rank order (one collective); ``[count]`` in one
    process."""
    if not (is_distributed() and world_size() > 1):
        return [int(count)]
    counts = torch.zeros(world_size(), dtype=torch.int64, device=device)
    counts[rank()] = int(count)
    return all_reduce_sum(counts).tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not (is_distributed() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True, on every rank together.

    One collective for the sum and the count; in one process, exactly ``agents.losses.masked_mean``.
    """
    maskf = mask.to(x.dtype)
    totals = torch.stack([(x * maskf).sum(), maskf.sum()])
    all_reduce_sum(totals)
    return totals[0] / totals[1].clamp(min=1.0)


def global_masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions of every rank (two passes: the global mean first)."""
    mean = global_masked_mean(x, mask)
    maskf = mask.to(x.dtype)
    totals = torch.stack([((x - mean) ** 2 * maskf).sum(), maskf.sum()])
    all_reduce_sum(totals)
    count = totals[1]
    var = totals[0] / count.clamp(min=1.0)
    if unbiased:
        var = var * count / (count - 1).clamp(min=1.0)
    return var


def global_masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / std`` with the mean and variance of the masked tokens of every rank; padding stays 0.

    Whitening with per-rank statistics would give each rank's advantages mean 0 and variance 1 on their own,
    which is a different update from the single-process one; these are the global statistics.
    """
    mean, var = global_masked_mean(x, mask), global_masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ------------------------------------------------------------------------------------------ the model
def _fsdp() -> Any:
    try:
        from torch.distributed import fsdp
    except ImportError:  # pragma: no cover - torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable import fsdp
    return fsdp


# Per FSDP module, the reshard_after_forward it was sharded with (restored after a rollout).
_RESHARD: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) is sharded with FSDP2."""
    if not is_distributed():
        return False
    fsdp_module = _fsdp().FSDPModule
    return any(isinstance(m, fsdp_module) for m in module.modules())


def _block_types(module: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every transformers model in ``module`` (``_no_split_modules``)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def _broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank hold rank 0's parameters and buffers (what DDP does at construction)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _shard(module: nn.Module) -> None:
    """FSDP2 ``fully_shard`` on each transformer block of ``module``, then on ``module`` itself (its root)."""
    fsdp = _fsdp()
    _broadcast_from_rank0(module)
    blocks = _block_types(module)
    for m in list(module.modules()):
        if m is not module and type(m).__name__ in blocks:
            fsdp.fully_shard(m, reshard_after_forward=True)
            _RESHARD[m] = True
    fsdp.fully_shard(module, reshard_after_forward=False)  # the root's weights are used again at once
    _RESHARD[module] = False


def data_parallel(
    module: nn.Module, *, strategy: Strategy = "ddp", shard: Sequence[nn.Module] | None = None
) -> nn.Module:
    """``module`` ready for data-parallel training; ``module`` itself in one process.

    Args:
        module: what the training step calls (its forward must run every trainable parameter whose
            gradient should be averaged, once per backward).
        strategy: ``"ddp"``: ``DistributedDataParallel`` keeps a full replica per rank and averages the
            gradients during the backward pass (call the returned wrapper, act with ``module``).
            ``"fsdp"``: FSDP2 ``fully_shard`` splits parameters, gradients and optimizer state across ranks
            (each transformer block is its own unit, gathered in its forward and backward): for models
            whose training state does not fit one device. Modules are sharded in place (build the
            optimizer afterwards); :func:`full_parameters` gathers the weights for a rollout.
        shard: with ``"fsdp"``, the modules to shard, each becoming its own FSDP root (default:
            ``module``); e.g. a policy and its value head, so that the policy alone can decode.

    Rank 0's weights are copied to every rank first, so ranks that built their models differently (a
    random LoRA initialisation) still start identical.
    """
    if not is_distributed():
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(module, DistributedDataParallel):
            return module
        device = model_device(module)
        # Buffers are constants here (rank 0's are copied at construction): syncing them before every forward
        # would cost a collective per call. torch >= 2.13 names the option forward_sync_buffers.
        parameters = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = (
            "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
        )
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, **{no_buffer_sync: False}
        )
    if strategy == "fsdp":
        for root in shard if shard is not None else [module]:
            if not is_sharded(root):
                _shard(root)
        return module
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap_parallel(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (FSDP2 modules are their own module)."""
    inner = getattr(module, "module", None)
    from torch.nn.parallel import DistributedDataParallel

    return inner if isinstance(module, DistributedDataParallel) else module


def _fsdp_modules(module: nn.Module) -> list[nn.Module]:
    if not is_distributed():
        return []
    fsdp_module = _fsdp().FSDPModule
    return [m for m in module.modules() if isinstance(m, fsdp_module)]


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside the block, backward passes reduce gradients across ranks only if ``enabled``.

    Gradient accumulation: disable it on all micro-batches of an optimizer step but the last; the
    accumulated gradients are then reduced once (``DistributedDataParallel.no_sync``, FSDP2
    ``set_requires_gradient_sync``). No-op in one process.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel) and not enabled:
        with module.no_sync():
            yield
        return
    sharded = _fsdp_modules(module)
    for m in sharded:
        m.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True, recurse=False)


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside the block an FSDP2-sharded ``module`` holds its full weights and its forward passes issue no
    collective, so each rank can decode at its own pace (rollouts of different lengths). No-op otherwise.

    All ranks must enter and leave the block together (gathering and freeing the weights are collectives).
    The full weights must fit one device: the rollout needs them anyway; sharding saves the gradients and
    the optimizer state, which are 3x (fp32 Adam) the weights, during the update.
    """
    sharded = _fsdp_modules(module)
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_reshard_after_forward(_RESHARD.get(m, True), recurse=False)
            m.reshard()


def full_state_dict(module: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``module`` on the CPU; a collective when it is FSDP-sharded.

    With FSDP2 every rank must call it and only rank 0 receives the tensors (the others get ``{}``). With
    ``trainable_only``, just the parameters that require gradients (e.g. LoRA adapters).
    """
    module = unwrap_parallel(module)
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = module.state_dict()
    if trainable_only:
        names = {name for name, p in module.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state
