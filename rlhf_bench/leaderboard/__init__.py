"""The offline RLHF benchmark: one environment, every agent, a leaderboard and over-optimisation plots.

``llm-env benchmark`` (or :func:`run_benchmark`) builds the built-in review task (a tiny SFT policy,
simulated preferences from a gold rater, proxy reward models), trains every registered agent against the
proxy on the same environment and prompts, and scores them all with the gold rater on held-out prompts.
Register your own entry with :func:`register_agent`.
"""

from rlhf_bench.leaderboard.artifacts import Artifacts, build_artifacts, default_cache_dir, load_byo_artifacts
from rlhf_bench.leaderboard.builtin_agents import RandomAgent, SB3Agent  # registers the built-in entries
from rlhf_bench.leaderboard.harness import (
    AgentEntry,
    BenchmarkContext,
    EvalResult,
    register_agent,
    registered_agents,
    win_rate,
)
from rlhf_bench.leaderboard.runner import BenchmarkResult, Row, best_of_k_curve, run_benchmark
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.task import ReviewTask

__all__ = [
    "AgentEntry",
    "Artifacts",
    "BenchmarkContext",
    "BenchmarkResult",
    "BenchmarkSettings",
    "EvalResult",
    "RandomAgent",
    "ReviewTask",
    "Row",
    "SB3Agent",
    "best_of_k_curve",
    "build_artifacts",
    "default_cache_dir",
    "load_byo_artifacts",
    "register_agent",
    "registered_agents",
    "run_benchmark",
    "win_rate",
]
