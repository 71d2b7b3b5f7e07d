"""Atomic training checkpoints: weights (safetensors), optimizer and scheduler, RNG states, counters.

A checkpoint is a directory written under a temporary name and renamed into place, so an interrupted
save never leaves a half-written checkpoint where a resume would find it. Tensors load with
``torch.load(weights_only=True)`` or safetensors; nothing in a checkpoint can execute code.

On N processes (:mod:`llm_env.distributed`) saving and loading are collective: every rank calls them.
Rank 0 writes the full weights (gathered from the shards when the model is FSDP-sharded), the optimizer
state (full and keyed by parameter name when sharded) and the RNG states of every rank, then all ranks
wait until the checkpoint is in place; on resume every rank reads the directory (on a filesystem all
ranks can read) and restores its own RNG state, so a run resumed on the same number of processes
continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm_env.distributed import (
    all_gather_objects,
    barrier,
    full_state_dict,
    is_main_process,
    is_sharded,
    rank,
    world_size,
)

__all__ = ["load_training_state", "rng_state", "save_training_state", "set_rng_state"]


def _trainable_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    state = full_state_dict(module, trainable_only=trainable_only)  # a collective when FSDP-sharded
    # safetensors refuses aliased tensors (tied embeddings): store each storage once, by its first name.
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in state.items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


def rng_state() -> dict[str, Any]:
    """The global Python, NumPy and torch (CPU and CUDA) random states, in types that
    ``torch.load(weights_only=True)`` accepts (ints, tuples, tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (saving the legacy global state)
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainable_only: bool = False,
    optimizer_model: nn.Module | None = None,
) -> Path:
    """Write a checkpoint directory atomically (on N processes: every rank calls it, rank 0 writes).

    Args:
        modules: named modules whose weights to save (``trainable_only`` keeps just the parameters that
            require gradients, e.g. LoRA adapters over a frozen base that is reloaded from its source).
        state: JSON-serialisable counters and settings (update index, KL coefficient, config, ...).
        optimizer_model: a module holding every parameter of ``optimizer``; needed when the modules are
            FSDP-sharded, whose optimizer state is gathered and stored by parameter name.
    """
    path = Path(path)
    rngs = all_gather_objects(rng_state())
    weights = {name: _trainable_state(module, trainable_only) for name, module in modules.items()}
    optimizer_state, optimizer_format = None, "native"
    if optimizer is not None:
        if any(is_sharded(m) for m in modules.values()):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            if optimizer_model is None:
                raise ValueError("saving the optimizer of FSDP-sharded modules needs optimizer_model=...")
            optimizer_state = get_optimizer_state_dict(
                optimizer_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            optimizer_format = "by_name"
        else:
            optimizer_state = optimizer.state_dict()
    if is_main_process():
        _write(path, weights, optimizer_state, optimizer_format, scheduler, rngs, state)
    barrier()  # nobody moves on (or exits) before the checkpoint is in place
    return path


def _write(
    path: Path,
    weights: dict[str, dict[str, torch.Tensor]],
    optimizer_state: Any,
    optimizer_format: str,
    scheduler: Any,
    rngs: list[dict[str, Any]],
    state: dict[str, Any],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    torch.save(
        {
            "optimizer": optimizer_state,
            "optimizer_format": optimizer_format,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rngs,  # one entry per rank
            "world_size": len(rngs),
        },
        tmp / "training.pt",
    )
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def load_training_state(
    path: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
    optimizer_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_training_state` into the given objects; return ``state``.

    On N processes every rank calls it; each restores its own RNG state when the checkpoint was written by
    as many processes (otherwise the RNG states are left alone, with a warning).
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (state.json missing)")
    for name, module in modules.items():
        _load_weights(module, load_file(str(path / f"{name}.safetensors")), f"{path}", name)
    blob = torch.load(path / "training.pt", weights_only=True)
    if optimizer is not None:
        if blob.get("optimizer_format", "native") == "by_name":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            if optimizer_model is None:
                raise ValueError(
                    f"checkpoint {path} stores its optimizer by parameter name: pass optimizer_model=..."
                )
            set_optimizer_state_dict(
                optimizer_model, optimizer, blob["optimizer"], options=StateDictOptions(full_state_dict=True)
            )
        elif any(is_sharded(m) for m in modules.values()):
            raise ValueError(
                f"checkpoint {path} was written without FSDP; resume it with strategy='ddp' (or in one process)"
            )
        else:
            optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if restore_rng:
        rngs = blob["rng"] if isinstance(blob["rng"], list) else [blob["rng"]]  # older checkpoints: one state
        if len(rngs) == world_size():
            set_rng_state(rngs[rank()])
        else:
            warnings.warn(
                f"checkpoint {path} holds the RNG states of {len(rngs)} processes but {world_size()} are running: "
                "the random states are not restored, so the resumed run will not repeat the original exactly",
                RuntimeWarning,
                stacklevel=2,
            )
    return json.loads((path / "state.json").read_text())


def _load_weights(module: nn.Module, weights: dict[str, torch.Tensor], where: str, name: str) -> None:
    if is_sharded(module):  # every rank reads the full tensors; FSDP keeps its shard of each
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing = set(weights) - set(module.state_dict())
        if missing:
            raise ValueError(
                f"checkpoint {where} has weights {sorted(missing)[:5]} that {name} does not have"
            )
        set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    device = next(module.parameters()).device
    missing = set(weights) - set(module.state_dict())
    if missing:
        raise ValueError(f"checkpoint {where} has weights {sorted(missing)[:5]} that {name} does not have")
    module.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
