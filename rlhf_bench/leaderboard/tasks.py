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

A *task family* resolves a whole namespace of names, ``<prefix>:<member>``, to entries on demand
(:func:`register_task_family`): ``reasoning-gym:<dataset>`` runs any dataset of the reasoning-gym library
through one adapter (:mod:`rlhf_bench.leaderboard.reasoning_gym`) without registering each by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_bench.leaderboard.settings import BenchmarkSettings

if TYPE_CHECKING:
    from rlhf_bench.leaderboard.artifacts import Artifacts

__all__ = [
    "DEFAULT_TASK",
    "TaskEntry",
    "TaskFamily",
    "get_task",
    "register_task",
    "register_task_family",
    "registered_task_families",
    "registered_tasks",
    "task_directory",
    "task_settings",
]

DEFAULT_TASK = "reviews"
"""What ``llm-env benchmark`` runs without ``--task``."""

TaskBuilder = Callable[..., "Artifacts"]
"""``builder(settings, *, directory, device, rebuild, log, progress) -> Artifacts``."""

SettingsAdjustment = Callable[[BenchmarkSettings], BenchmarkSettings]
"""``adjust(settings) -> settings``: a task's own settings, derived from the preset it runs under."""


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: its name, the builder of its artifacts, a one-line description, its version."""

    name: str
    builder: TaskBuilder
    description: str = ""
    version: int = 1
    """Part of the cache key: bump it when the task's data, reward or artifact building changes."""
    settings: SettingsAdjustment | None = None
    """The task's own settings, as a function of the preset's (quick, full, tiny or the caller's): what the
    task needs changed to be a fair test of the agents (e.g. a longer token budget for 5-token answers).
    :func:`~rlhf_bench.leaderboard.run_benchmark` applies it unless ``task_settings=False`` and records what it
    changed in the leaderboard's provenance (:func:`task_settings`)."""


@dataclass(frozen=True)
class TaskFamily:
    """Tasks named ``<prefix>:<member>``, resolved on demand: ``resolve(member)`` returns the builder of that
    member's artifacts (raising a ValueError for a member it does not know), ``version`` is every member's."""

    prefix: str
    resolve: Callable[[str], TaskBuilder]
    description: str = ""
    version: int = 1
    settings: SettingsAdjustment | None = None
    """Every member's own settings (:attr:`TaskEntry.settings`)."""


_REGISTRY: dict[str, TaskEntry] = {}
_FAMILIES: dict[str, TaskFamily] = {}


def _check_name(name: str, what: str = "task names") -> None:
    if not name or any(c.isspace() for c in name) or any(c in name for c in ",/\\:"):
        raise ValueError(
            f"{what} must be non-empty, without spaces, commas, colons or slashes (they name a cache "
            f"directory), got {name!r}"
        )


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"a task's version must be an integer >= 0, got {version!r}")


def register_task(
    name: str,
    *,
    description: str = "",
    version: int = 1,
    settings: SettingsAdjustment | None = None,
) -> Callable[[TaskBuilder], TaskBuilder]:
    """Decorator adding ``builder`` to the benchmark's tasks under ``name`` (see the module docstring).

    ``settings`` adjusts the benchmark's settings for this task (:attr:`TaskEntry.settings`), e.g.
    ``lambda s: dataclasses.replace(s, token_budget=3 * s.token_budget)``; it must leave the artifact fields
    (the cache key) alone. Registering a name again replaces the earlier entry (as re-running a notebook cell
    expects).
    """
    _check_name(name)
    _check_version(version)
    if settings is not None and not callable(settings):
        raise TypeError(f"settings must be a function settings -> settings, got {type(settings).__name__}")

    def decorate(builder: TaskBuilder) -> TaskBuilder:
        text = description or (builder.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = TaskEntry(name, builder, text, version, settings)
        return builder

    return decorate


def register_task_family(
    prefix: str,
    resolve: Callable[[str], TaskBuilder],
    *,
    description: str = "",
    version: int = 1,
    settings: SettingsAdjustment | None = None,
) -> TaskFamily:
    """Make every name ``<prefix>:<member>`` a task: :func:`get_task` calls ``resolve(member)`` for the
    builder. Registering a prefix again replaces the earlier family."""
    _check_name(prefix, "task family prefixes")
    _check_version(version)
    family = TaskFamily(prefix, resolve, description, version, settings)
    _FAMILIES[prefix] = family
    return family


def registered_tasks() -> dict[str, TaskEntry]:
    """All registered tasks, in registration order (the built-ins, registered when
    :mod:`rlhf_bench.leaderboard` is imported, come first); task families are not listed here
    (:func:`registered_task_families`)."""
    return dict(_REGISTRY)


def registered_task_families() -> dict[str, TaskFamily]:
    """All registered task families, by prefix."""
    return dict(_FAMILIES)


def get_task(name: str) -> TaskEntry:
    """The task registered under ``name``, or the member of a task family that ``<prefix>:<member>``
    names; an unknown name raises, listing the registered tasks and families."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    prefix, colon, member = name.partition(":")
    if colon and prefix in _FAMILIES:
        _check_name(member, f"the member of a {prefix}: task")
        family = _FAMILIES[prefix]
        return TaskEntry(name, family.resolve(member), family.description, family.version, family.settings)
    families = [f"{prefix}:<name>" for prefix in _FAMILIES]
    raise ValueError(
        f"unknown task {name!r}; registered tasks: {list(_REGISTRY)}"
        + (f", task families: {families}" if families else "")
        + " (add your own with rlhf_bench.leaderboard.register_task)"
    )


def task_settings(name: str, settings: BenchmarkSettings) -> tuple[BenchmarkSettings, dict[str, Any]]:
    """``settings`` as the task ``name`` runs them (its :attr:`TaskEntry.settings` applied), and what changed:
    ``{field: {"preset": before, "task": after}}`` (empty for a task without its own settings). A change to
    an artifact field raises: the task's cache key would no longer describe its artifacts."""
    entry = get_task(name)
    if entry.settings is None:
        return settings, {}
    adjusted = entry.settings(settings)
    if not isinstance(adjusted, BenchmarkSettings):
        raise TypeError(
            f"task {name!r}: its settings function must return BenchmarkSettings, got {type(adjusted).__name__}"
        )
    before, after = settings.to_dict(), adjusted.to_dict()
    changed = {key: {"preset": before[key], "task": after[key]} for key in after if after[key] != before[key]}
    artifact = sorted(set(changed) & set(BenchmarkSettings.ARTIFACT_FIELDS))
    if artifact:
        raise ValueError(
            f"task {name!r}: its settings function changed artifact fields {artifact}; set those in the preset "
            "(they define the cached SFT policy), not per task"
        )
    return adjusted, changed


def task_directory(name: str, settings: BenchmarkSettings, cache_dir: str | os.PathLike) -> Path:
    """``<cache_dir>/benchmark/<name>-<hash of the artifact settings and the task's version>`` (a family
    member's ``:`` written ``+``, which every file system accepts)."""
    entry = get_task(name)
    key = settings.artifact_key(task_version=entry.version)
    return Path(cache_dir) / "benchmark" / f"{name.replace(':', '+')}-{key}"
