"""Atomic training checkpoints: weights (safetensors), optimizer and scheduler, RNG states, counters.

A checkpoint is a directory written under a temporary name and renamed into place, so an interrupted
save never leaves a half-written checkpoint where a resume would find it. Tensors load with
``torch.load(weights_only=True)`` or safetensors; nothing in a checkpoint can execute code.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["load_training_state", "rng_state", "save_training_state", "set_rng_state"]


def _trainable_state(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if not trainable_only:
        state = module.state_dict()
    else:
        state = {name: p for name, p in module.named_parameters() if p.requires_grad}
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
) -> Path:
    """Write a checkpoint directory atomically.

    Args:
        modules: named modules whose weights to save (``trainable_only`` keeps just the parameters that
            require gradients, e.g. LoRA adapters over a frozen base that is reloaded from its source).
        state: JSON-serialisable counters and settings (update index, KL coefficient, config, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_trainable_state(module, trainable_only), str(tmp / f"{name}.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
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
    return path


def load_training_state(
    path: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_training_state` into the given objects; return ``state``."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (state.json missing)")
    for name, module in modules.items():
        weights = load_file(str(path / f"{name}.safetensors"))
        device = next(module.parameters()).device
        missing = set(weights) - set(module.state_dict())
        if missing:
            raise ValueError(f"checkpoint {path} has weights {sorted(missing)[:5]} that {name} does not have")
        module.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
    blob = torch.load(path / "training.pt", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(blob["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(blob["scheduler"])
    if restore_rng:
        set_rng_state(blob["rng"])
    return json.loads((path / "state.json").read_text())
