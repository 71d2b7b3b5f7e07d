"""Measurement: memory above a baseline, timings with the load of other processes, and the run itself.

Throughput is generated tokens per second, the median over ``repeats`` timed runs after ``warmup`` untimed
runs; the repetitions of all variants are interleaved (round-robin) so that a change of machine load
affects them alike, and the ratios are computed from medians measured in the same process. Every timed run
records the CPU cores other processes used meanwhile (``other_load``), the 1-minute load average after it
(``load_average``) and the CPU time of this process (``cpu_seconds``, all its threads); when the floor ran,
every variant's throughput is also reported as a ratio of the floor's (``ratio_to_floor``), and by CPU time
(``ratio_to_floor_cpu``: tokens per CPU second, a cleaner comparison on a shared machine with one thread,
where other processes take wall-clock time from the run but not CPU time). A peer whose packages are missing
is skipped with its reason (``skipped``).

Under ``torchrun --nproc-per-node N`` (:mod:`llm_env.distributed`) every rank runs every variant with its
own ``batch_size`` episodes, the ranks start each timed run together (a barrier) and a run takes as long
as its slowest rank: the reported throughput is all ranks' tokens over that time, and ``ppo-update`` is a
data-parallel update (gradients averaged across the ranks). ``torchrun --nproc-per-node 2 ... --threads 1
--batch-size 8`` against ``--threads 2 --batch-size 16`` in one process compares 2 processes x 1 thread
with 1 process x 2 threads on the same global batch. ``lora-memory`` measures one process only.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during the warm-up run minus the allocation before
the variant built its models (so it includes the variant's models, caches and activations); on CPU, the
kernel's high-water mark of the process's resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before the run) minus the RSS before the variant built its models. CPU allocators
keep freed memory, so RSS depends on what ran before: the LoRA memory comparison therefore runs each of its
setups in a fresh process on CPU (``memory_isolation``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, NamedTuple

import torch

from llm_env import AdapterDisabled
from llm_env.distributed import all_gather_objects, barrier, init_distributed, world_size
from rlhf_bench.throughput.models import Setup, build_setup
from rlhf_bench.throughput.report import environment
from rlhf_bench.throughput.settings import ThroughputSettings
from rlhf_bench.throughput.variants import (
    CUDA_ONLY,
    OPTIONAL,
    RATIOS,
    ROLLOUTS,
    VARIANTS,
    Variant,
    env_rollout,
    make_env,
    model_bytes,
    ppo_agent,
    unavailable,
)

__all__ = ["MEMORY_SETUPS", "run_throughput"]


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the high-water mark, which cannot be reset
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _release_memory(device: torch.device) -> None:
    """Return freed memory to the OS / the CUDA allocator so that baselines are comparable."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages otherwise


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of our resident set size (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _peak_rss() is not None
    except OSError:
        return False


def _peak_rss() -> int | None:
    """VmHWM: the peak resident set size since the last :func:`_reset_peak_rss`, in bytes."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus the allocation before the variant's models"
    return "peak resident set size (the kernel's VmHWM) minus the RSS before the variant's models"


class _MemoryTracker:
    """Peak memory above a baseline taken at construction (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _release_memory(device)
        if device.type == "cuda":
            self.baseline = torch.cuda.memory_allocated(device)
        else:
            self.baseline = _rss_bytes()
        self.peak = self.baseline

    @property
    def measure(self) -> str:
        return _memory_measure(self.device)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Record the peak during the ``with`` block."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        if _reset_peak_rss():  # exact: the kernel keeps the high-water mark
            try:
                yield
            finally:
                self.peak = max(self.peak, _peak_rss() or 0)
            return
        stop = threading.Event()

        def sample() -> None:  # elsewhere: poll the resident set size
            while not stop.is_set():
                self.peak = max(self.peak, _rss_bytes())
                stop.wait(0.002)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, _rss_bytes())

    @property
    def increase(self) -> int:
        return int(self.peak - self.baseline)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process), or None where /proc is missing."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        with open("/proc/self/stat") as handle:
            own = handle.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
    return busy, int(own[11]) + int(own[12])  # utime + stime of all our threads


def _other_load(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float:
    """CPU cores used by other processes during a run: a warning sign for the timing on a shared machine."""
    if before is None or after is None or seconds <= 0:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / ticks / seconds)


def _load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timing(NamedTuple):
    seconds: float  # wall-clock
    tokens: int
    other_load: float  # CPU cores other processes used meanwhile
    cpu_seconds: float  # CPU time of this process (all its threads)


def _timed(run: Callable[[int], int], rep: int, device: torch.device) -> _Timing:
    """Wall-clock seconds, generated tokens, other processes' load and this process's CPU time of one run.

    On N processes the ranks start together and the run lasts until the slowest one finishes: the
    seconds are the longest rank's, the tokens those of all ranks.
    """
    _sync(device)
    barrier()
    before = _cpu_jiffies()
    cpu = time.process_time()
    start = time.perf_counter()
    tokens = run(rep)
    _sync(device)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    load = _other_load(before, _cpu_jiffies(), seconds)
    if world_size() > 1:
        ranks = all_gather_objects((seconds, tokens, load, cpu))
        seconds, tokens = max(r[0] for r in ranks), sum(r[1] for r in ranks)
        load, cpu = max(r[2] for r in ranks), max(r[3] for r in ranks)
    return _Timing(seconds, tokens, load, cpu)


def _rollouts(setup: Setup, names: Sequence[str], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Build every rollout variant (measuring its memory in its first run), then time them round-robin."""
    s = setup.settings
    built: dict[str, Variant] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        tracker = _MemoryTracker(setup.device)
        variant = ROLLOUTS[name].build(setup)
        warmup = 0 if (name == "no-cache" and s.no_cache_repeats == 1) else s.warmup
        timings: list[float] = []
        cpu: list[float] = []
        loads: list[float] = []
        averages: list[float] = []
        with tracker.track():
            first = _timed(variant.run, 10_000, setup.device)  # untimed unless the only run
        if warmup == 0:
            timings.append(first.seconds)
            cpu.append(first.cpu_seconds)
            loads.append(first.other_load)
            averages.append(_load_average())
        for rep in range(1, warmup):
            variant.run(10_000 + rep)
        built[name] = variant
        results[name] = {
            "seconds": timings,
            "cpu_seconds": cpu,
            "other_load": loads,
            "load_average": averages,
            "model_bytes": variant.model_bytes,
            "peak_memory_bytes": tracker.increase,
            "memory_measure": tracker.measure,
        }
        log(f"built {name}: peak memory {tracker.increase / 2**20:.0f} MiB")
    for rep in range(max(s.repeats, s.no_cache_repeats)):
        for name, variant in built.items():
            wanted = s.no_cache_repeats if name == "no-cache" else s.repeats
            if len(results[name]["seconds"]) >= wanted:
                continue
            timing = _timed(variant.run, rep, setup.device)
            if timing.tokens != setup.tokens * world_size():
                raise RuntimeError(
                    f"{name} generated {timing.tokens} tokens, expected {setup.tokens * world_size()}"
                )
            results[name]["seconds"].append(timing.seconds)
            results[name]["cpu_seconds"].append(timing.cpu_seconds)
            results[name]["other_load"].append(timing.other_load)
            results[name]["load_average"].append(_load_average())
            log(
                f"{name} run {rep + 1}: {timing.tokens / timing.seconds:,.0f} tokens/s "
                f"(other processes: {timing.other_load:.2f} cores)"
            )
    for result in results.values():
        median = statistics.median(result["seconds"])
        tokens = setup.tokens * world_size()
        result.update(tokens=tokens, median_seconds=median, tokens_per_s=tokens / median)
        result["tokens_per_cpu_s"] = tokens / statistics.median(result["cpu_seconds"])
    built.clear()
    _release_memory(setup.device)
    return results


def _ppo_update(setup: Setup, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokens per second per PPO epoch of the full and the LoRA agent, on one rollout's episodes."""
    s = setup.settings
    out: dict[str, Any] = {}
    for label, lora in (("full", False), ("lora", True)):
        agent = ppo_agent(setup, setup.copy(setup.policy), lora=lora)
        env = make_env(setup, agent.reference, setup.copy(setup.reward))
        trajectories = env_rollout(env, agent, setup, seed=s.seed)

        def update(rep: int, agent: Any = agent, trajectories: Any = trajectories) -> int:
            agent.learn(trajectories)  # on N processes: a data-parallel update over every rank's episodes
            return 0

        warm = max(1, s.warmup)
        timings = [_timed(update, rep, setup.device).seconds for rep in range(warm + s.repeats)][warm:]
        median = statistics.median(timings)
        tokens = int(trajectories.lengths.sum()) * world_size()
        out[label] = {
            "tokens": tokens,
            "ppo_epochs": s.ppo_epochs,
            "seconds": timings,
            "tokens_per_s_per_epoch": tokens * s.ppo_epochs / median,
        }
        log(f"ppo-update {label}: {out[label]['tokens_per_s_per_epoch']:,.0f} tokens/s per epoch")
        del agent, env, trajectories, update
        _release_memory(setup.device)
    return out


def _zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return [0.0] * len(responses)


MEMORY_SETUPS = ("policy_alone", "adapter_disabled_reference", "fused_reference", "separate_reference")


def _lora_memory_setup(setup: Setup, label: str) -> dict[str, Any]:
    """Peak memory of one rollout + one PPO update of a LoRA agent with the reference ``label``.

    The reward is a constant callable, so that the numbers compare the policy and its reference only.
    """
    tracker = _MemoryTracker(setup.device)
    base = setup.copy(setup.policy)
    separate = setup.copy(setup.policy) if label == "separate_reference" else None
    agent = ppo_agent(setup, base, lora=True, reference=separate)
    reference = {
        "policy_alone": None,
        "adapter_disabled_reference": AdapterDisabled(agent.policy),
        "fused_reference": AdapterDisabled(agent.policy, fuse=True),
        "separate_reference": separate,
    }[label]
    with tracker.track():
        env = make_env(setup, reference, _zero_reward)
        trajectories = env_rollout(env, agent, setup, seed=setup.settings.seed)
        agent.learn(trajectories)
    models = [agent.policy, agent.value_head] + ([separate] if separate is not None else [])
    result = {"peak_memory_bytes": tracker.increase, "model_bytes": model_bytes(*models)}
    del agent, env, trajectories, base, separate, reference
    _release_memory(setup.device)
    return result


def _lora_memory_child(settings: dict[str, Any], label: str) -> dict[str, Any]:
    """:func:`_lora_memory_setup` in a fresh process (the entry point of the spawned child)."""
    settings = ThroughputSettings(**settings)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    return _lora_memory_setup(build_setup(settings), label)


def _lora_memory(setup: Setup, log: Callable[[str], None]) -> dict[str, Any]:
    """LoRA policy alone / + adapter-disabled reference / + fused reference / + separate copy."""
    isolate = setup.device.type == "cpu" and setup.settings.memory_isolation
    out: dict[str, Any] = {}
    for label in MEMORY_SETUPS:
        if isolate:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(1) as pool:
                out[label] = pool.apply(_lora_memory_child, (asdict(setup.settings), label))
        else:
            out[label] = _lora_memory_setup(setup, label)
        log(f"lora-memory {label}: peak {out[label]['peak_memory_bytes'] / 2**20:.0f} MiB")
    alone = out["policy_alone"]["peak_memory_bytes"]
    for label in MEMORY_SETUPS[1:]:
        out[label]["ratio_to_policy_alone"] = out[label]["peak_memory_bytes"] / max(alone, 1)
    out["memory_measure"] = _memory_measure(setup.device) + (
        " (each setup in a fresh process)" if isolate else ""
    )
    return out


def run_throughput(
    settings: ThroughputSettings, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the selected variants and return the report (what ``--json`` writes)."""
    log = log or (lambda message: None)
    init_distributed()  # under torchrun: every rank measures, rank 0 reports
    if world_size() > 1 and settings.variants is not None and "lora-memory" in settings.variants:
        raise ValueError("lora-memory measures one process: run it without torchrun")
    previous_threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        setup = build_setup(settings)
        variants = settings.variants
        if variants is None:  # all that apply to the device (and to N processes); the peers when named
            variants = tuple(
                v
                for v in VARIANTS
                if (setup.device.type == "cuda" or v not in CUDA_ONLY) and v not in OPTIONAL
            )
            if world_size() > 1:
                variants = tuple(v for v in variants if v != "lora-memory")
        elif setup.device.type != "cuda" and set(variants) & set(CUDA_ONLY):
            raise ValueError(f"{', '.join(CUDA_ONLY)} need a CUDA device")
        skipped = {name: reason for name in variants if (reason := unavailable(name))}
        for reason in skipped.values():
            log(f"skipped: {reason}")
        report: dict[str, Any] = {
            "settings": {**asdict(settings), "variants": list(variants)},
            "environment": {**environment(setup.device), "processes": world_size()},
            "load_average_start": _load_average(),
            "variants": {},
            "ratios": {},
        }
        if skipped:
            report["skipped"] = skipped
        rollouts = [name for name in ROLLOUTS if name in variants and name not in skipped]
        if rollouts:
            report["variants"] = _rollouts(setup, rollouts, log)
        speed = {name: result["tokens_per_s"] for name, result in report["variants"].items()}
        for numerator, denominator, label in RATIOS:
            if numerator in speed and denominator in speed:
                report["ratios"][label] = speed[numerator] / speed[denominator]
        if "floor" in speed:
            floor = report["variants"]["floor"]
            for result in report["variants"].values():
                result["ratio_to_floor"] = result["tokens_per_s"] / floor["tokens_per_s"]
                result["ratio_to_floor_cpu"] = result["tokens_per_cpu_s"] / floor["tokens_per_cpu_s"]
        if "ppo-update" in variants:
            report["ppo_update"] = _ppo_update(setup, log)
        if "lora-memory" in variants:
            report["lora_memory"] = _lora_memory(setup, log)
    finally:
        torch.set_num_threads(previous_threads)
    loads = [x for r in report["variants"].values() for x in r["other_load"] if x == x]  # skip NaN
    report["max_other_load"] = max(loads, default=float("nan"))
    report["load_average_end"] = _load_average()
    return report
