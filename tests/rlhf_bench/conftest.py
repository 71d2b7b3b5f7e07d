"""Fixtures of the application tests: the benchmark's tiny configuration, built once per session."""

import pytest

from rlhf_bench.leaderboard import BenchmarkSettings, build_artifacts


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A cache directory holding the tiny configuration's SFT policy and reward models, and their metrics."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    artifacts = build_artifacts(BenchmarkSettings.tiny(), cache_dir=cache, progress=False, log=lambda _: None)
    return cache, artifacts.metrics
