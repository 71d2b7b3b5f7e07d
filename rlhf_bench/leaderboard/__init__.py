"""The offline RLHF benchmark: one environment, every agent, a leaderboard and over-optimisation plots.

``llm-env benchmark`` (or :func:`run_benchmark`) builds a task, by default the review task (a tiny SFT
policy, simulated preferences from a gold rater, proxy reward models), trains every registered agent against
the task's reward on the same environment and prompts (``settings.seeds`` times, with independent seeds),
and scores them all with its gold on held-out prompts, every number with a 95% bootstrap interval
(:mod:`~rlhf_bench.leaderboard.stats`) and every row with what it consumed. ``--task sorting`` runs the
built-in verifiable task instead (a checker is reward and gold), ``--task reasoning-gym:<dataset>`` any
dataset of reasoning-gym (``rg-spell-backward`` and ``rg-count-bits`` at a difficulty the tiny policies learn
partly; ``pip install -e ".[tasks]"``). Register your own entry with
:func:`register_agent`, your own task with :func:`register_task`.
"""

from rlhf_bench.leaderboard.artifacts import Artifacts, build_artifacts, default_cache_dir, load_byo_artifacts
from rlhf_bench.leaderboard.builtin_agents import RandomAgent, SB3Agent  # registers the built-in entries
from rlhf_bench.leaderboard.guessing import GuessingTask  # registers the built-in multi-turn task
from rlhf_bench.leaderboard.harness import (
    AgentEntry,
    BenchmarkContext,
    CountingReward,
    EvalResult,
    TrainingCurve,
    register_agent,
    registered_agents,
    win_rate,
)
from rlhf_bench.leaderboard.rows import Row, SeedRow, summarise
from rlhf_bench.leaderboard.runner import BenchmarkResult, best_of_k_curve, run_benchmark
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.sorting import SortingTask  # registers the built-in verifiable task
from rlhf_bench.leaderboard.stats import Estimate, Resampler, paired_difference
from rlhf_bench.leaderboard.task import ReviewTask
from rlhf_bench.leaderboard.tasks import TaskEntry, register_task, registered_tasks
from rlhf_bench.leaderboard.verifiable import VerifiableTask, build_verifiable_artifacts

# isort: split
# After the built-in tasks, which the registry lists first; reasoning-gym itself is imported on first use.
from rlhf_bench.leaderboard.reasoning_gym import ReasoningGymTask  # registers the reasoning-gym tasks

__all__ = [
    "AgentEntry",
    "Artifacts",
    "BenchmarkContext",
    "BenchmarkResult",
    "BenchmarkSettings",
    "CountingReward",
    "Estimate",
    "EvalResult",
    "GuessingTask",
    "RandomAgent",
    "ReasoningGymTask",
    "Resampler",
    "ReviewTask",
    "Row",
    "SB3Agent",
    "SeedRow",
    "SortingTask",
    "TaskEntry",
    "TrainingCurve",
    "VerifiableTask",
    "best_of_k_curve",
    "build_artifacts",
    "build_verifiable_artifacts",
    "default_cache_dir",
    "load_byo_artifacts",
    "paired_difference",
    "register_agent",
    "register_task",
    "registered_agents",
    "registered_tasks",
    "run_benchmark",
    "summarise",
    "win_rate",
]
