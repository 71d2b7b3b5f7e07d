"""``--nproc`` workers: what they check before any work (the multi-process runs are in test_distributed.py)."""

from __future__ import annotations

import json

import pytest

from rlhf_bench.leaderboard import BenchmarkSettings
from rlhf_bench.leaderboard.launch import TrainingJob, _check_built
from rlhf_bench.leaderboard.tasks import task_directory


def test_a_worker_refuses_to_build_the_artifacts_the_parent_should_have_built(tmp_path):
    settings = BenchmarkSettings.tiny()
    job = TrainingJob(
        "ppo", settings, tmp_path / "out", "cpu", artifacts={"cache_dir": tmp_path, "task": "sorting"}
    )
    directory = task_directory("sorting", settings, tmp_path)
    with pytest.raises(RuntimeError, match=f"no built artifacts of task 'sorting' in {directory}"):
        _check_built(job)
    directory.mkdir(parents=True)
    (directory / "artifacts.json").write_text(json.dumps({}))  # what a finished build leaves
    _check_built(job)
    other = TrainingJob(
        "ppo", BenchmarkSettings.tiny(seed=7), tmp_path / "out", "cpu", artifacts=job.artifacts
    )
    with pytest.raises(RuntimeError, match="settings or cache directory differ"):
        _check_built(other)  # another seed is another cache key
