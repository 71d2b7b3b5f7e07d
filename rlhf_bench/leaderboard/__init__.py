"""The offline RLHF benchmark: one environment, every agent, a leaderboard and over-optimisation plots.

``llm-env benchmark`` (or :func:`run_benchmark`) builds the built-in review task (a tiny SFT policy,
simulated preferences from a gold rater, proxy reward models), trains every registered agent against the
proxy on the same environment and prompts (``settings.seeds`` times, with independent seeds), and scores them
all with the gold rater on held-out prompts, every number with a 95% bootstrap interval
(:mod:`~rlhf_bench.leaderboard.stats`) and every row with what it consumed. Register your own entry with
:func:`register_agent`.
"""

from rlhf_bench.leaderboard.artifacts import Artifacts, build_artifacts, default_cache_dir, load_byo_artifacts
from rlhf_bench.leaderboard.builtin_agents import RandomAgent, SB3Agent  # registers the built-in entries
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
from rlhf_bench.leaderboard.stats import Estimate, Resampler, paired_difference
from rlhf_bench.leaderboard.task import ReviewTask

__all__ = [
    "AgentEntry",
    "Artifacts",
    "BenchmarkContext",
    "BenchmarkResult",
    "BenchmarkSettings",
    "CountingReward",
    "Estimate",
    "EvalResult",
    "RandomAgent",
    "Resampler",
    "ReviewTask",
    "Row",
    "SB3Agent",
    "SeedRow",
    "TrainingCurve",
    "best_of_k_curve",
    "build_artifacts",
    "default_cache_dir",
    "load_byo_artifacts",
    "paired_difference",
    "register_agent",
    "registered_agents",
    "run_benchmark",
    "summarise",
    "win_rate",
]
