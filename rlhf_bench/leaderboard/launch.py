"""``llm-env benchmark --nproc N``: train the data-parallel entries on N local processes.

PPO (and its beta sweep), rejection sampling, the critic-free policy-gradient rows (GRPO, Dr. GRPO, DAPO,
GSPO, RLOO, REINFORCE++, ReMax) and both DPO rows train on N processes started by torchrun's own launcher
API (:func:`torch.distributed.launcher.api.elastic_launch`: a local rendezvous on a free port, no
restarts, every worker stopped as soon as one fails). Each worker loads the benchmark's cached artifacts,
trains the entry with its share of the data (:mod:`llm_env.distributed`), and rank 0 saves the trained
policy; the parent process then evaluates that policy on the held-out prompts exactly as it evaluates an
entry trained in-process, so the leaderboard's columns mean the same thing for every row. The wall time
of such a row includes starting the workers and loading the models.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from agents.policy import TokenSampler, save_policy
from llm_env.distributed import init_distributed, is_main_process, shutdown_distributed, world_size
from llm_env.models import load_causal_lm, resolve_device
from rlhf_bench.leaderboard.artifacts import build_artifacts, default_cache_dir, load_byo_artifacts
from rlhf_bench.leaderboard.builtin_agents import ppo_run
from rlhf_bench.leaderboard.harness import BenchmarkContext, registered_agents
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.tasks import DEFAULT_TASK, task_directory

__all__ = ["DATA_PARALLEL_ENTRIES", "TrainingJob", "train_on_processes"]

DATA_PARALLEL_ENTRIES = (
    "ppo",
    "rejection-sampling",
    "grpo",
    "grpo-kl-loss",
    "rloo",
    "dr-grpo",
    "dapo",
    "gspo",
    "reinforce-pp",
    "remax",
    "dpo",
    "online-dpo",
)
"""Leaderboard entries that ``--nproc`` trains on several processes (PPO's beta sweep runs follow "ppo")."""


@dataclass(frozen=True)
class TrainingJob:
    """What a worker needs to rebuild the benchmark's context and train one entry (picklable)."""

    entry: str
    """Registered entry to train, or the label of a PPO sweep run (then ``kl_coef`` is set)."""
    settings: BenchmarkSettings
    out_dir: Path
    device: str
    """``"cpu"`` or ``"cuda"`` (each worker takes the GPU of its local rank)."""
    artifacts: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :func:`build_artifacts` (``cache_dir``, ``task``: the workers rebuild the
    chosen task's context), or of :func:`load_byo_artifacts` (``policy``, ``reward_model``, ...) when
    ``byo`` is set."""
    byo: bool = False
    kl_coef: float | None = None
    progress: bool = True
    seed: int | None = None
    """The agent's seed when it differs from ``settings.seed`` (``--seeds``: the artifacts still come from
    ``settings``)."""


def train_on_processes(ctx: BenchmarkContext, job: TrainingJob, nproc: int) -> TokenSampler:
    """Train ``job`` on ``nproc`` local processes; return the trained policy as an agent to evaluate.

    The workers' records (training curves, histories) are added to ``ctx`` under the entry's name, with
    ``reward_calls``: the responses the proxy scored on all ranks together.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if job.device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(
            f"--nproc {nproc} needs {nproc} GPUs but this machine has {torch.cuda.device_count()}"
        )
    with tempfile.TemporaryDirectory(prefix="llm-env-policy-") as directory:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=f"llm-env-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # a free port
            max_restarts=0,  # a failing worker stops them all; the error reaches the parent
            monitor_interval=0.5,
        )
        outputs = elastic_launch(config, _train)(job, directory)
        records = dict(outputs[0])
        records["reward_calls"] = sum(output.pop("reward_calls") for output in outputs.values())
        ctx.record(job.entry, **records)
        policy = load_causal_lm(directory, device=ctx.device, dtype=torch.float32).eval()
    return TokenSampler(policy, seed=ctx.settings.seed)


def _check_built(job: TrainingJob) -> None:
    """The workers only load the task's artifacts, which the parent built before launching them: were they
    missing (a cache key that differs between the parent and the workers), every rank would build them into
    the same directory at once. Fail instead, naming the directory."""
    task = job.artifacts.get("task") or DEFAULT_TASK
    cache_dir = job.artifacts.get("cache_dir") or default_cache_dir()
    directory = task_directory(task, job.settings, cache_dir)
    if not (directory / "artifacts.json").is_file():
        raise RuntimeError(
            f"a --nproc worker found no built artifacts of task {task!r} in {directory}: the parent process "
            "builds them before it launches the workers, so the workers' settings or cache directory differ "
            "from the parent's"
        )


def _train(job: TrainingJob, directory: str) -> dict[str, Any]:
    """One worker: rebuild the context, train the entry with the others, rank 0 saves the policy."""
    init_distributed()
    if job.device == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
    main = is_main_process()

    def log(message: str) -> None:
        if main:
            print(message, flush=True)

    if job.byo:
        artifacts = load_byo_artifacts(**job.artifacts, settings=job.settings, device=job.device, log=log)
    else:
        _check_built(job)
        artifacts = build_artifacts(job.settings, **job.artifacts, device=job.device, log=lambda _: None)
    settings = job.settings if job.seed is None else dataclasses.replace(job.settings, seed=job.seed)
    ctx = BenchmarkContext(
        artifacts,
        settings,
        resolve_device(job.device),
        job.out_dir,
        log=log,
        progress=job.progress and main,
    )
    if job.kl_coef is not None:
        agent = ppo_run(ctx, job.entry, job.kl_coef)
    else:
        agent = registered_agents()[job.entry].factory(ctx)
    save_policy(agent.policy, ctx.tokenizer, directory)  # every rank calls it, rank 0 writes
    records = {**ctx.records.get(job.entry, {}), "reward_calls": ctx.reward.calls}
    # Free the DDP/FSDP wrappers while the process group still exists: a gloo group destroyed under a live
    # DDP reducer leaves its destructor (run later, at garbage collection) joining threads that never end.
    del agent, ctx
    gc.collect()
    shutdown_distributed()
    return records
