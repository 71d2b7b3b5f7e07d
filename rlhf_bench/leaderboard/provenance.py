"""What a benchmark run needs to be reproduced: package versions, the git commit, the device, the command.

Written into ``leaderboard.json`` (``provenance``) and ``report.html``. Everything is read locally: package
metadata, ``git rev-parse HEAD`` in the checkout this package was imported from (when it is one), and the
device's name; nothing touches the network.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

__all__ = ["DISTRIBUTION", "git_state", "provenance", "versions"]

DISTRIBUTION = "llm-env"
"""This package's distribution name (``pip install llm-env``)."""

PACKAGES = ("torch", "transformers", "numpy", "gymnasium", "stable-baselines3", "peft", "tokenizers")
"""Dependencies whose versions can change a benchmark's numbers."""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Python's and every relevant package's version (None when one is not installed); ``llm-env`` is this
    package (None when it is imported from a checkout without being installed)."""
    out: dict[str, str | None] = {"python": platform.python_version(), DISTRIBUTION: _version(DISTRIBUTION)}
    out.update({name: _version(name) for name in PACKAGES})
    out["torch"] = torch.__version__  # the build actually imported (e.g. 2.13.0+cpu)
    return out


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": HEAD, "dirty": uncommitted changes to tracked files}`` of the git checkout holding
    ``path`` (default: this package's source), or None when it is not in one or git is missing."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def device_description(device: torch.device) -> dict[str, Any]:
    """The device the agents ran on: its name and, on CPU, the cores and threads torch used."""
    out: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        out["name"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    else:
        out["name"] = platform.processor() or platform.machine()
    out["cpu_count"] = os.cpu_count()
    out["torch_threads"] = torch.get_num_threads()
    return out


def provenance(device: torch.device) -> dict[str, Any]:
    """Versions, git state, device and command line of this run (see the module docstring)."""
    return {
        "versions": versions(),
        "git": git_state(),
        "device": device_description(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else None,
        "deterministic_on_cpu": "the same command with the same seed gives the same numbers on the same "
        "machine and thread count (wall times and throughputs aside)",
    }
