"""``run_benchmark``: build the task, train every agent on the same environment, evaluate, report."""

from __future__ import annotations

import dataclasses
import random
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
    CURVE_METRICS,
    BenchmarkContext,
    EvalResult,
    registered_agents,
    select_agents,
)
from rlhf_bench.leaderboard.launch import DATA_PARALLEL_ENTRIES, TrainingJob, train_on_processes
from rlhf_bench.leaderboard.passk import measure_pass_at_k, pass_at_k_description
from rlhf_bench.leaderboard.provenance import provenance
from rlhf_bench.leaderboard.rows import Row, SeedRow, seed_row, summarise
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.stats import LEVEL, Resampler
from rlhf_bench.leaderboard.tasks import DEFAULT_TASK, get_task, task_settings

__all__ = ["BenchmarkResult", "Row", "SeedRun", "best_of_k_curve", "run_benchmark", "statistics_description"]


@dataclass
class SeedRun:
    """One repetition of the agent sweep: its rows, best-of-k points, records and evaluations."""

    seed: int
    rows: list[SeedRow]
    best_of_k: list[dict[str, Any]]
    """Best-of-k points with their per-prompt values (``values``) for the intervals."""
    records: dict[str, dict[str, Any]]
    results: dict[str, EvalResult]


@dataclass
class BenchmarkResult:
    """Everything the report shows, also written to ``leaderboard.json``.

    ``rows`` are the summary over ``seeds`` with 95% intervals; ``per_seed`` holds every seed's own rows
    (intervals over its evaluation prompts only) and records. ``records`` and ``samples`` are the first
    seed's; ``curves`` and ``best_of_k`` are averaged over seeds, with intervals."""

    rows: list[Row]
    settings: dict[str, Any]
    artifacts: dict[str, Any]
    best_of_k: list[dict[str, Any]] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    has_gold: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    """The registered task the agents ran on (None: your own models)."""
    verifiable: bool = False
    """Whether the task's reward is its gold (a checker): no proxy gap."""
    task_settings: dict[str, Any] = field(default_factory=dict)
    """What the task's own settings changed in the preset, ``{field: {"preset": ..., "task": ...}}``
    (:func:`~rlhf_bench.leaderboard.tasks.task_settings`); ``settings`` holds the values the run used."""
    pass_at_k: dict[str, Any] = field(default_factory=dict)
    """On a verifiable task, how the rows' pass@k were measured (:mod:`~rlhf_bench.leaderboard.passk`); empty
    on other tasks."""


def best_of_k_curve(
    samples: EvalResult, ks: Sequence[int], baseline: EvalResult
) -> tuple[list[dict[str, Any]], dict[int, dict[str, np.ndarray]]]:
    """Best-of-k from ``n`` SFT samples per prompt, for every k dividing n with at least two groups.

    The winner of each group of k (by proxy score) stands for one best-of-k response; its KL from the SFT
    policy is measured by :func:`agents.best_of_k_kl` and reported next to ``log k - (k-1)/k``. Returns the
    points (means) and, for each k, the per-prompt values of every leaderboard metric (the KL estimate of
    each prompt's groups; the win-rate pairs group m with the baseline's draw ``m mod draws``).
    """
    order = samples.order()
    n_prompts = samples.num_prompts
    n = len(order) // n_prompts
    proxy = samples.proxy[order].reshape(n_prompts, n)
    use_gold = samples.gold is not None and baseline.gold is not None
    gold = samples.gold[order].reshape(n_prompts, n) if samples.gold is not None else None
    judged = gold if use_gold else proxy
    base = (baseline.gold if use_gold else baseline.proxy)[baseline.order()].reshape(n_prompts, -1)
    points, values = [], {}
    for k in ks:
        if n % k or n // k < 2:
            continue
        m = n // k
        winners = proxy.reshape(n_prompts, m, k).argmax(axis=2)[..., None]  # (P, m, 1)
        win_proxy = np.take_along_axis(proxy.reshape(n_prompts, m, k), winners, 2)[..., 0]  # (P, m)
        win_judged = np.take_along_axis(judged.reshape(n_prompts, m, k), winners, 2)[..., 0]
        paired = base[:, np.arange(m) % base.shape[1]]
        kl = np.array([best_of_k_kl(proxy[p : p + 1], k) for p in range(n_prompts)])  # (P,)
        values[k] = {
            "gold": win_judged.mean(axis=1) if gold is not None else np.full(n_prompts, np.nan),
            "proxy": win_proxy.mean(axis=1),
            "kl": kl,
            "win_rate": ((win_judged > paired) + 0.5 * (win_judged == paired)).mean(axis=1),
        }
        points.append(
            {
                "k": k,
                "kl_measured": float(kl.mean()),
                "kl_theory": best_of_k_kl_theory(k),
                "proxy": float(win_proxy.mean()),
                "gold": float(values[k]["gold"].mean()) if gold is not None else float("nan"),
            }
        )
    return points, values


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
    use_task_settings: bool = True,
) -> BenchmarkResult:
    """Run the benchmark and write the leaderboard, plots, samples and ``report.html`` to ``out_dir``.

    The SFT policy, the reward models and the prompts are built (or loaded) once from ``settings.seed``;
    the whole agent sweep then runs ``settings.seeds`` times, with seeds ``settings.run_seeds()`` for the
    agents' training and the evaluation sampling, and every row is summarised over seeds and held-out
    prompts with 95% bootstrap intervals (:mod:`rlhf_bench.leaderboard.rows`).

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
        nproc: train the data-parallel entries (``launch.DATA_PARALLEL_ENTRIES``: PPO with its sweep,
            rejection sampling, the critic-free agents, offline and online DPO) on this many local processes
            (:mod:`rlhf_bench.leaderboard.launch`); evaluation stays in this process.
        use_task_settings: apply the task's own settings to ``settings`` (e.g. the sorting task's budget and
            update shape; :func:`~rlhf_bench.leaderboard.tasks.task_settings`), recorded in the result's
            ``task_settings``; False runs the preset as it is.
    """
    from rlhf_bench.leaderboard.report import write_report

    settings = settings or BenchmarkSettings.quick()
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    device = resolve_device(device)
    _seed_everything(settings.seed)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    byo_run = policy is not None or reward_model is not None
    if byo_run and task is not None:
        raise ValueError(
            f"--task {task} builds a task's own models: drop it to run on your own --policy and --reward-model"
        )
    task = None if byo_run else (task or DEFAULT_TASK)
    changed: dict[str, Any] = {}
    if task is not None:
        get_task(task)  # an unknown name fails before anything is built
        if use_task_settings:
            settings, changed = task_settings(task, settings)
            if changed:
                log(
                    f"task {task}'s own settings: "
                    + ", ".join(f"{key} {v['preset']} -> {v['task']}" for key, v in changed.items())
                )
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
    byo = dict(
        policy=policy,
        reward_model=reward_model,
        prompts=prompts,
        reference=reference,
        gold_reward_model=gold_reward_model,
    )

    selected = select_agents(agents or None)
    seeds = settings.run_seeds()

    def seed_dir(seed: int) -> Path:
        """Where a seed's TensorBoard logs go: ``out_dir``, or ``out_dir/seed-N`` with several seeds."""
        return out_dir if len(seeds) == 1 else out_dir / f"seed-{seed}"

    def job(entry: str, seed: int, **kwargs: Any) -> TrainingJob:
        """A training job for ``nproc`` processes, rebuilding this run's artifacts in every worker."""
        return TrainingJob(
            entry,
            settings,
            seed_dir(seed),
            device.type,
            artifacts=byo if policy is not None else {"cache_dir": cache_dir, "task": task},
            byo=policy is not None,
            progress=progress,
            seed=seed,
            **kwargs,
        )

    runs: list[SeedRun] = []
    shared_reference = None
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            log(
                f"seed {seed} ({i + 1} of {len(seeds)}): the agent sweep, on the shared SFT policy and reward models"
            )
        ctx = BenchmarkContext(
            artifacts,
            dataclasses.replace(settings, seed=seed),
            device,
            seed_dir(seed),
            log=log,
            progress=progress,
            _reference=shared_reference,
        )
        shared_reference = ctx.reference  # loaded once, shared by every seed
        runs.append(_run_seed(ctx, selected, job, nproc))

    rank_by = "gold" if artifacts.gold is not None else "proxy"
    n_prompts = runs[0].results["sft"].num_prompts
    resamples, boot_seed = settings.bootstrap_resamples, settings.seed
    resampler = Resampler.draw(len(seeds), n_prompts, resamples=resamples, seed=boot_seed)
    within = Resampler.draw(1, n_prompts, resamples=resamples, seed=boot_seed)
    rows = summarise([run.rows for run in runs], resampler, rank_by)
    per_seed = [
        {
            "seed": run.seed,
            "rows": summarise([run.rows], within, rank_by),
            "best_of_k": [_without_values(p) for p in run.best_of_k],
            "records": run.records,
        }
        for run in runs
    ]
    result = BenchmarkResult(
        rows=rows,
        settings=settings.to_dict(),
        artifacts=artifacts.metrics,
        best_of_k=_best_of_k_summary(runs, resampler),
        records=runs[0].records,
        samples=_samples(runs[0].results, n=6),
        seconds=time.perf_counter() - start,
        device=str(device),
        has_gold=artifacts.gold is not None,
        seeds=seeds,
        per_seed=per_seed,
        curves=_curves_summary(runs, resamples, boot_seed),
        statistics=statistics_description(len(seeds), n_prompts, settings, rank_by),
        provenance=provenance(device),
        task=task,
        task_settings=changed,
        verifiable=artifacts.verifiable,
        pass_at_k=pass_at_k_description(
            settings, n_prompts, runs[0].records, success_score=artifacts.success_score
        )
        if artifacts.verifiable
        else {},
    )
    write_report(result, out_dir, log=log)
    return result


def _seed_everything(seed: int) -> None:
    """Seed the global generators an entry might draw from (torch's and ``random``'s; the agents draw from
    their own seeded generators), so that an entry's numbers do not depend on which entries ran before it."""
    torch.manual_seed(seed)
    random.seed(seed)


def _run_seed(
    ctx: BenchmarkContext, selected: list[str], job: Callable[..., TrainingJob], nproc: int
) -> SeedRun:
    """The whole agent sweep on one seed (``ctx.settings.seed``)."""
    settings, log, seed = ctx.settings, ctx.log, ctx.settings.seed
    registry = registered_agents()

    _seed_everything(seed)
    tick = time.perf_counter()
    sft_policy = registry["sft"].factory(ctx)
    wall = time.perf_counter() - tick
    baseline = ctx.evaluate(sft_policy, "sft")
    rows = [
        seed_row(
            "sft", baseline, None, wall_time_s=wall, note=registry["sft"].description, **_usage(ctx, "sft", 0)
        )
    ]
    results: dict[str, EvalResult] = {"sft": baseline}
    log(
        f"sft: gold {_mean(rows[0], 'gold'):.3f}, proxy {_mean(rows[0], 'proxy'):.3f} on {len(baseline.responses)} held-out responses"
    )

    def pass_rates(agent: Any, row: SeedRow) -> None:
        """On a verifiable task, the row's pass@k from ``pass_k_samples`` more answers to every held-out
        prompt (:mod:`~rlhf_bench.leaderboard.passk`)."""
        if not ctx.artifacts.verifiable:
            return
        row.pass_at_k = measure_pass_at_k(ctx, agent, row.agent)
        shown = ", ".join(f"pass@{k} {values.mean():.3f}" for k, values in row.pass_at_k.items())
        seconds = ctx.records[row.agent]["pass_at_k_seconds"]
        log(f"{row.agent}: {shown} ({settings.pass_k_samples} samples per held-out prompt, {seconds:.1f}s)")

    pass_rates(sft_policy, rows[0])

    points: list[dict[str, Any]] = []
    if "best-of-k" in selected:
        _seed_everything(seed)
        tick = time.perf_counter()
        sampler = TokenSampler(ctx.load_policy().eval(), seed=seed + 1)
        samples = ctx.evaluate(sampler, "best-of-k", samples=settings.bon_samples, with_kl=False)
        ks = [2**i for i in range(0, 12) if 2**i <= settings.bon_samples // 2]
        points, values = best_of_k_curve(samples, ks, baseline)
        n = settings.bon_samples
        answers = len(baseline.responses)  # what every other row is evaluated on
        mean_length = float(samples.lengths.mean())
        for point in points:
            k = point["k"]
            point["values"] = values[k]
            if k in (max(1, ks[-1] // 4), ks[-1]) and k > 1:
                row = SeedRow(
                    agent=f"best-of-{k}",
                    values=values[k],
                    sampled_tokens=k * mean_length * answers,
                    reward_calls=float(k * answers),
                    gradient_steps=0.0,
                    wall_time_s=samples.seconds * k / n,
                    tokens_per_s=samples.tokens_per_s / k,
                    note=f"KL theory {point['kl_theory']:.3f}; the budget columns are its inference cost on "
                    f"the {answers} held-out answers (k samples and k proxy scores each)",
                )
                rows.append(row)
        shown = ", ".join(
            f"k={p['k']}: KL {p['kl_measured']:.2f} (theory {p['kl_theory']:.2f})" for p in points
        )
        log(f"best-of-k: {shown} ({time.perf_counter() - tick:.0f}s)")

    def add(name: str, train: Callable[[], Any], description: str) -> None:
        _seed_everything(seed)
        calls = ctx.reward.calls
        tick = time.perf_counter()
        agent = train()
        wall = time.perf_counter() - tick
        record = ctx.records.get(name, {})
        wall -= record.get("curve_seconds", 0.0)  # the evaluations along training are not training
        results[name] = result = ctx.evaluate(agent, name)
        row = seed_row(
            name,
            result,
            baseline,
            wall_time_s=wall,
            note=_note(description, record),
            **_usage(ctx, name, ctx.reward.calls - calls),
        )
        rows.append(row)
        log(
            f"{name}: gold {_mean(row, 'gold'):.3f}, proxy {_mean(row, 'proxy'):.3f}, KL {_mean(row, 'kl'):.2f}, "
            f"win-rate {_mean(row, 'win_rate'):.2f} ({wall:.0f}s"
            + (f", {row.sampled_tokens:,.0f} sampled tokens)" if row.sampled_tokens else ")")
        )
        pass_rates(agent, row)

    for name in selected:
        if name in ("sft", "best-of-k"):
            continue
        if name in ctx.artifacts.unsupported_agents:
            log(f"{name}: skipped, {ctx.artifacts.unsupported_agents[name]}")
            continue
        entry = registry[name]
        if nproc > 1 and name in DATA_PARALLEL_ENTRIES:
            add(name, lambda name=name: train_on_processes(ctx, job(name, seed), nproc), entry.description)
        else:
            add(name, lambda entry=entry: entry.factory(ctx), entry.description)
        if name == "ppo":
            for beta in settings.sweep_kl_coefs:
                label = f"ppo-beta-{beta:g}"
                if nproc > 1:
                    train = lambda label=label, beta=beta: train_on_processes(  # noqa: E731
                        ctx, job(label, seed, kl_coef=beta), nproc
                    )
                else:
                    train = lambda label=label, beta=beta: ppo_run(ctx, label, beta)  # noqa: E731
                add(label, train, f"PPO with beta={beta:g} (over-optimisation sweep)")
    return SeedRun(seed, rows, points, ctx.records, results)


def _mean(row: SeedRow, metric: str) -> float:
    values = row.values[metric]
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _usage(ctx: BenchmarkContext, name: str, reward_calls: int) -> dict[str, float | None]:
    """What an entry consumed: the tokens and steps its factory recorded (None when it recorded none) and
    the responses the proxy scored (counted here, or by the workers of ``--nproc``)."""
    record = ctx.records.get(name, {})
    sampled, steps = record.get("sampled_tokens"), record.get("gradient_steps")
    return {
        "sampled_tokens": float(sampled) if sampled is not None else None,
        "reward_calls": float(record.get("reward_calls", reward_calls)),
        "gradient_steps": float(steps) if steps is not None else None,
    }


def _without_values(point: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in point.items() if key not in ("values", "per_prompt")}


def _best_of_k_summary(runs: list[SeedRun], resampler: Resampler) -> list[dict[str, Any]]:
    """Best-of-k points averaged over seeds, with intervals of the gold, proxy and measured KL."""
    out = []
    for j, point in enumerate(runs[0].best_of_k):
        summary = {"k": point["k"], "kl_theory": point["kl_theory"]}
        for metric, key in (("kl", "kl_measured"), ("proxy", "proxy"), ("gold", "gold")):
            estimate = resampler.estimate(np.stack([run.best_of_k[j]["values"][metric] for run in runs]))
            summary[key], summary[f"{key}_low"], summary[f"{key}_high"] = (
                estimate.mean,
                estimate.low,
                estimate.high,
            )
        out.append(summary)
    return out


def _curves_summary(runs: list[SeedRun], resamples: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every training curve averaged over seeds point by point (the k-th point of every seed is the one
    after the same fraction of the budget), with intervals of the gold, proxy, KL and response length."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, record in runs[0].records.items():
        if not record.get("curve"):
            continue
        per_seed = [run.records.get(name, {}).get("curve") or [] for run in runs]
        if any(len(curve) != len(per_seed[0]) for curve in per_seed):
            raise ValueError(f"the curves of {name} have different lengths on different seeds")
        n_prompts = len(per_seed[0][0]["per_prompt"]["proxy"])
        resampler = Resampler.draw(len(runs), n_prompts, resamples=resamples, seed=seed)
        points = []
        for j, point in enumerate(per_seed[0]):
            summary: dict[str, Any] = {
                "fraction": point["fraction"],
                "update": float(np.mean([curve[j]["update"] for curve in per_seed])),
                "sampled_tokens": float(np.mean([curve[j]["sampled_tokens"] for curve in per_seed])),
            }
            for metric in CURVE_METRICS:
                estimate = resampler.estimate(
                    np.stack([curve[j]["per_prompt"][metric] for curve in per_seed])
                )
                summary[metric], summary[f"{metric}_low"], summary[f"{metric}_high"] = (
                    estimate.mean,
                    estimate.low,
                    estimate.high,
                )
            points.append(summary)
        curves[name] = points
    return curves


def statistics_description(
    n_seeds: int, n_prompts: int, settings: BenchmarkSettings, rank_by: str
) -> dict[str, Any]:
    """How the intervals and the significance marks were computed, for the report and ``leaderboard.json``."""
    if n_seeds == 1:
        covers = (
            f"evaluation-prompt sampling only ({n_prompts} held-out prompts, resampled): one training run per "
            "agent, so the intervals do not cover training randomness"
        )
        method = f"percentile bootstrap over the {n_prompts} held-out prompts"
    else:
        covers = (
            f"training randomness and evaluation-prompt sampling: {n_seeds} independent agent runs (seeds), "
            f"each evaluated on the same {n_prompts} held-out prompts"
        )
        method = (
            f"hierarchical percentile bootstrap: resample the {n_seeds} seeds, then the {n_prompts} held-out "
            "prompts within each resampled seed"
        )
    return {
        "level": LEVEL,
        "method": method,
        "resamples": settings.bootstrap_resamples,
        "bootstrap_seed": settings.seed,
        "prompts": n_prompts,
        "draws": settings.eval_samples,
        "unit": "held-out prompt (its draws averaged)",
        "covers": covers,
        "seeds": settings.run_seeds(),
        "shared": f"the SFT policy, reward models and prompts are built once from seed {settings.seed} and "
        "shared by every seed",
        "ranking_metric": rank_by,
        "significance": f"paired bootstrap of the difference in mean {rank_by} score to the best row (same "
        "resampled seeds and prompts for both rows); a row whose 95% interval of the difference contains 0 is "
        "not significantly different from the best (marked †)",
        "win_rate": "paired with the SFT policy's answer to the same prompt and draw on the same seed (ties "
        "count one half)",
    }


def _note(description: str, record: dict[str, Any] | None) -> str:
    """A row's note: its description, and the response tokens it sampled when it trains on the budget."""
    if not record or "token_budget" not in record:
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
