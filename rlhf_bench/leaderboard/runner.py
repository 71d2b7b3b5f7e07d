"""``run_benchmark``: build the task, train every agent on the same environment, evaluate, report."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.policy import TokenSampler
from agents.rejection import best_of_k_kl, best_of_k_kl_theory
from llm_env.models import resolve_device
from rlhf_bench.leaderboard.artifacts import Artifacts, build_artifacts, load_byo_artifacts
from rlhf_bench.leaderboard.builtin_agents import ppo_run
from rlhf_bench.leaderboard.harness import (
    BenchmarkContext,
    EvalResult,
    registered_agents,
    select_agents,
    win_rate,
)
from rlhf_bench.leaderboard.launch import DATA_PARALLEL_ENTRIES, TrainingJob, train_on_processes
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.tasks import DEFAULT_TASK, get_task

__all__ = ["BenchmarkResult", "Row", "best_of_k_curve", "run_benchmark"]


@dataclass
class Row:
    """One leaderboard line."""

    agent: str
    gold: float
    proxy: float
    kl: float
    win_rate: float
    tokens_per_s: float
    wall_time_s: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass
class BenchmarkResult:
    """Everything the report shows, also written to ``leaderboard.json``."""

    rows: list[Row]
    settings: dict[str, Any]
    artifacts: dict[str, Any]
    best_of_k: list[dict[str, float]] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    has_gold: bool = True
    task: str | None = None
    """The registered task the agents ran on (None: your own models)."""
    verifiable: bool = False
    """Whether the task's reward is its gold (a checker): no proxy gap."""


def _row(name: str, result: EvalResult, baseline: EvalResult | None, wall: float, note: str = "") -> Row:
    use_gold = result.gold is not None
    return Row(
        agent=name,
        gold=float(np.mean(result.gold)) if use_gold else float("nan"),
        proxy=float(np.mean(result.proxy)),
        kl=float(np.nanmean(result.kl)) if np.isfinite(result.kl).any() else float("nan"),
        win_rate=win_rate(result, baseline, use_gold=use_gold) if baseline is not None else 0.5,
        tokens_per_s=result.tokens_per_s,
        wall_time_s=wall,
        note=note,
    )


def best_of_k_curve(
    samples: EvalResult, ks: Sequence[int], baseline: EvalResult
) -> tuple[list[dict[str, float]], dict[int, Row]]:
    """Best-of-k from ``n`` SFT samples per prompt, for every k dividing n with at least two groups.

    The winner of each group of k (by proxy score) stands for one best-of-k response; its KL from the SFT
    policy is measured by :func:`agents.best_of_k_kl` and reported next to ``log k - (k-1)/k``.
    """
    order = samples.order()
    n_prompts = len(np.unique(samples.prompt_index))
    n = len(order) // n_prompts
    proxy = samples.proxy[order].reshape(n_prompts, n)
    gold = samples.gold[order].reshape(n_prompts, n) if samples.gold is not None else None
    base_gold = baseline.gold[baseline.order()].reshape(n_prompts, -1) if baseline.gold is not None else None
    points, rows = [], {}
    for k in ks:
        if n % k or n // k < 2:
            continue
        winners = proxy.reshape(n_prompts, n // k, k).argmax(axis=2)[..., None]  # (P, m, 1)
        win_proxy = np.take_along_axis(proxy.reshape(n_prompts, n // k, k), winners, 2)[..., 0]
        win_gold = (
            np.take_along_axis(gold.reshape(n_prompts, n // k, k), winners, 2)[..., 0]
            if gold is not None
            else None
        )
        point = {
            "k": k,
            "kl_measured": best_of_k_kl(proxy, k),
            "kl_theory": best_of_k_kl_theory(k),
            "proxy": float(win_proxy.mean()),
            "gold": float(win_gold.mean()) if win_gold is not None else float("nan"),
        }
        points.append(point)
        if base_gold is not None and win_gold is not None:
            paired = base_gold[:, np.arange(win_gold.shape[1]) % base_gold.shape[1]]
            wins = float(np.mean((win_gold > paired) + 0.5 * (win_gold == paired)))
        else:
            wins = float("nan")
        rows[k] = Row(
            agent=f"best-of-{k}",
            gold=point["gold"],
            proxy=point["proxy"],
            kl=point["kl_measured"],
            win_rate=wins,
            tokens_per_s=samples.tokens_per_s / k,
            wall_time_s=samples.seconds * k / n,
            note=f"KL theory {point['kl_theory']:.3f}",
        )
    return points, rows


def run_benchmark(
    settings: BenchmarkSettings | None = None,
    *,
    task: str | None = None,
    agents: Sequence[str] | None = None,
    device: torch.device | str = "auto",
    out_dir: str | Path = "runs/benchmark",
    cache_dir: str | Path | None = None,
    rebuild: bool = False,
    policy: str | None = None,
    reference: str | None = None,
    reward_model: str | None = None,
    prompts: str | None = None,
    gold_reward_model: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    nproc: int = 1,
) -> BenchmarkResult:
    """Run the benchmark and write the leaderboard, plots and samples to ``out_dir``.

    Args:
        settings: budgets (default :meth:`BenchmarkSettings.quick`).
        task: the registered task to build and run on (default ``"reviews"``; see
            :mod:`rlhf_bench.leaderboard.tasks`); not with your own models.
        agents: entries to run (default: the default entries, plus ``best-of-k``; ``["all"]``: every
            registered entry; see :func:`~rlhf_bench.leaderboard.harness.select_agents`); ``sft`` always runs.
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
        policy, reference, reward_model, prompts, gold_reward_model: run on your own models and prompts
            instead of the built-in task (paths or hub names); without a gold model the leaderboard ranks by
            the reward model and reports no gold score.
        nproc: train PPO (with its sweep) and rejection sampling on this many local processes
            (:mod:`rlhf_bench.leaderboard.launch`); evaluation stays in this process.
    """
    from rlhf_bench.leaderboard.report import write_report

    settings = settings or BenchmarkSettings.quick()
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    device = resolve_device(device)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byo_run = policy is not None or reward_model is not None
    if byo_run and task is not None:
        raise ValueError(
            f"--task {task} builds a task's own models: drop it to run on your own --policy and --reward-model"
        )
    task = None if byo_run else (task or DEFAULT_TASK)
    if task is not None:
        get_task(task)  # an unknown name fails before anything is built
    if byo_run:
        if policy is None or reward_model is None:
            raise ValueError(
                "bring both --policy and --reward-model (and --prompts) to run on your own models"
            )
        artifacts: Artifacts = load_byo_artifacts(
            policy=policy,
            reward_model=reward_model,
            prompts=prompts,
            reference=reference,
            gold_reward_model=gold_reward_model,
            settings=settings,
            device=device,
            log=log,
        )
    else:
        artifacts = build_artifacts(
            settings,
            task=task,
            cache_dir=cache_dir,
            device=device,
            rebuild=rebuild,
            log=log,
            progress=progress,
        )
    ctx = BenchmarkContext(artifacts, settings, device, out_dir, log=log, progress=progress)
    byo = dict(
        policy=policy,
        reward_model=reward_model,
        prompts=prompts,
        reference=reference,
        gold_reward_model=gold_reward_model,
    )

    def job(entry: str, **kwargs: Any) -> TrainingJob:
        """A training job for ``nproc`` processes, rebuilding this run's artifacts in every worker."""
        return TrainingJob(
            entry,
            settings,
            out_dir,
            device.type,
            artifacts=byo if policy is not None else {"cache_dir": cache_dir, "task": task},
            byo=policy is not None,
            progress=progress,
            **kwargs,
        )

    registry = registered_agents()
    selected = select_agents(agents or None)

    tick = time.perf_counter()
    sft_policy = registry["sft"].factory(ctx)
    baseline = ctx.evaluate(sft_policy, "sft")
    rows = [_row("sft", baseline, None, time.perf_counter() - tick, registry["sft"].description)]
    results: dict[str, EvalResult] = {"sft": baseline}
    log(
        f"sft: gold {rows[0].gold:.3f}, proxy {rows[0].proxy:.3f} on {len(baseline.responses)} held-out responses"
    )

    curve: list[dict[str, float]] = []
    if "best-of-k" in selected:
        tick = time.perf_counter()
        sampler = TokenSampler(ctx.load_policy().eval(), seed=settings.seed + 1)
        samples = ctx.evaluate(sampler, "best-of-k", samples=settings.bon_samples, with_kl=False)
        ks = [2**i for i in range(0, 12) if 2**i <= settings.bon_samples // 2]
        curve, bon_rows = best_of_k_curve(samples, ks, baseline)
        for k in sorted(bon_rows):
            if k in (max(1, ks[-1] // 4), ks[-1]) and k > 1:
                rows.append(bon_rows[k])
        shown = ", ".join(
            f"k={p['k']}: KL {p['kl_measured']:.2f} (theory {p['kl_theory']:.2f})" for p in curve
        )
        log(f"best-of-k: {shown} ({time.perf_counter() - tick:.0f}s)")

    for name in selected:
        if name in ("sft", "best-of-k"):
            continue
        entry = registry[name]
        tick = time.perf_counter()
        if nproc > 1 and name in DATA_PARALLEL_ENTRIES:
            agent = train_on_processes(ctx, job(name), nproc)
        else:
            agent = entry.factory(ctx)
        wall = time.perf_counter() - tick
        results[name] = result = ctx.evaluate(agent, name)
        row = _row(name, result, baseline, wall, _note(entry.description, ctx.records.get(name)))
        rows.append(row)
        log(
            f"{name}: gold {row.gold:.3f}, proxy {row.proxy:.3f}, KL {row.kl:.2f}, win-rate {row.win_rate:.2f} ({wall:.0f}s)"
        )
        if name == "ppo":
            for beta in settings.sweep_kl_coefs:
                label = f"ppo-beta-{beta:g}"
                tick = time.perf_counter()
                if nproc > 1:
                    swept = train_on_processes(ctx, job(label, kl_coef=beta), nproc)
                else:
                    swept = ppo_run(ctx, label, beta)
                wall = time.perf_counter() - tick
                results[label] = result = ctx.evaluate(swept, label)
                note = _note(f"PPO with beta={beta:g} (over-optimisation sweep)", ctx.records.get(label))
                rows.append(_row(label, result, baseline, wall, note))
                log(
                    f"{label}: gold {rows[-1].gold:.3f}, proxy {rows[-1].proxy:.3f}, KL {rows[-1].kl:.2f} ({wall:.0f}s)"
                )

    samples_table = _samples(results, n=6)
    result = BenchmarkResult(
        rows=rows,
        settings=settings.to_dict(),
        artifacts=artifacts.metrics,
        best_of_k=curve,
        records=ctx.records,
        samples=samples_table,
        seconds=time.perf_counter() - start,
        device=str(device),
        has_gold=artifacts.gold is not None,
        task=task,
        verifiable=artifacts.verifiable,
    )
    write_report(result, out_dir, log=log)
    return result


def _note(description: str, record: dict[str, Any] | None) -> str:
    """A row's note: its description, and the response tokens it sampled when it trains on the budget."""
    if not record or "sampled_tokens" not in record:
        return description
    return (
        f"{description}; {record['sampled_tokens']:,} response tokens sampled "
        f"(budget {record['token_budget']:,})"
    )


def _samples(results: dict[str, EvalResult], n: int) -> list[dict[str, Any]]:
    """The first sample of every agent for the first ``n`` held-out prompts, side by side."""
    out = []
    for index in range(n):
        entry: dict[str, Any] = {"prompt": None, "responses": {}}
        for name, result in results.items():
            hits = np.flatnonzero((result.prompt_index == index) & (result.sample == 0))
            if hits.size == 0:
                continue
            i = int(hits[0])
            entry["prompt"] = result.prompts[i]
            entry["responses"][name] = {
                "text": result.responses[i],
                "gold": float(result.gold[i]) if result.gold is not None else None,
                "proxy": float(result.proxy[i]),
            }
        if entry["prompt"] is not None:
            out.append(entry)
    return out
