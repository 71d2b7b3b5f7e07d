"""The task registry: what ``llm-env benchmark --task NAME`` can build.

A task is a builder that returns the :class:`~rlhf_bench.leaderboard.artifacts.Artifacts` every agent
shares (SFT policy, tokenizer, the reward the agents optimise, the gold that scores them, training and
held-out prompts). Two are built in: ``reviews`` (the default: a gold rater and proxy reward models learned
from simulated preferences, so over-optimisation shows) and ``sorting`` (a verifiable reward: a checker
is both reward and gold, no proxy gap). Registering your own takes one decorated function::

    from rlhf_bench.leaderboard import build_verifiable_artifacts, register_task

    @register_task("my-task", description="what it asks for", version=1)
    def my_task(settings, **options):
        return build_verifiable_artifacts(MyTask(seed=settings.seed), settings, **options)

The builder is called as ``builder(settings, directory=..., device=..., rebuild=..., log=..., progress=...)``.
``directory`` is the task's own cache directory, ``<cache>/benchmark/<name>-<hash>/``: the hash covers the
settings' artifact fields and the task's ``version``, so bumping the version (when the generator, the reward
or the way the artifacts are built changes) rebuilds them, for this task alone. Register at import time
(module level): ``--nproc`` workers rebuild the context by importing the modules again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_bench.leaderboard.settings import BenchmarkSettings

if TYPE_CHECKING:
    from rlhf_bench.leaderboard.artifacts import Artifacts

__all__ = ["DEFAULT_TASK", "TaskEntry", "get_task", "register_task", "registered_tasks", "task_directory"]

DEFAULT_TASK = "reviews"
"""What ``llm-env benchmark`` runs without ``--task``."""

TaskBuilder = Callable[..., "Artifacts"]
"""``builder(settings, *, directory, device, rebuild, log, progress) -> Artifacts``."""


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: its name, the builder of its artifacts, a one-line description, its version."""

    name: str
    builder: TaskBuilder
    description: str = ""
    version: int = 1
    """Part of the cache key: bump it when the task's data, reward or artifact building changes."""


_REGISTRY: dict[str, TaskEntry] = {}


def register_task(
    name: str, *, description: str = "", version: int = 1
) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator adding ``builder`` to the benchmark's tasks under ``name`` (see the module docstring).

    Registering a name again replaces the earlier entry (as re-running a notebook cell expects).
    """
    if not name or any(c.isspace() for c in name) or any(c in name for c in ",/\\"):
        raise ValueError(
            f"task names must be non-empty, without spaces, commas or slashes (they name a cache directory), "
            f"got {name!r}"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"a task's version must be an integer >= 0, got {version!r}")

    def decorate(builder: TaskBuilder) -> TaskBuilder:
        text = description or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = TaskEntry(name, builder, text, version)
        return builder

    return decorate


def registered_tasks() -> dict[str, TaskEntry]:
    """All registered tasks, in registration order (the built-ins, registered when
    :mod:`rlhf_bench.leaderboard` is imported, come first)."""
    return dict(_REGISTRY)


def get_task(name: str) -> TaskEntry:
    """The task registered under ``name``; an unknown name raises, listing the registered ones."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown task {name!r}; registered tasks: {list(_REGISTRY)} "
            "(add your own with rlhf_bench.leaderboard.register_task)"
        )
    return _REGISTRY[name]


def task_directory(name: str, settings: BenchmarkSettings, cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/benchmark/<name>-<hash of the artifact settings and the task's version>``."""
    entry = get_task(name)
    return Path(cache_dir) / "benchmark" / f"{name}-{settings.artifact_key(task_version=entry.version)}"
