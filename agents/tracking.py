"""What every trainer logs the same way: diagnostics collected per step, TensorBoard, JSON-safe configs."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["append_stat", "jsonable", "scalar", "tensorboard_writer"]


def scalar(value: Any) -> float:
    """A float from a number or a 0-d tensor (detached; a DTensor such as FSDP2's gradient norm is gathered)."""
    if hasattr(value, "full_tensor"):  # a DTensor (FSDP2's gradient norm)
        value = value.full_tensor()
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def append_stat(stats: dict[str, list[float]], key: str, value: Any) -> None:
    """Append one value (a float or a 0-d tensor, detached) to the list ``stats[key]``."""
    stats.setdefault(key, []).append(scalar(value))


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything that is not a JSON scalar as its ``str``."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def tensorboard_writer(log_dir: str | None) -> Any:
    """A TensorBoard ``SummaryWriter`` writing to ``log_dir``, or None when ``log_dir`` is None."""
    if log_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir)
