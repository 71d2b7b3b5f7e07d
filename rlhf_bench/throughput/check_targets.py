"""Check the throughput targets of the performance issue against ``llm-env bench-throughput`` JSON reports.

Usage: ``python rlhf_bench/throughput/check_targets.py rlhf_bench/throughput/results/*.json``. Prints one line per target that
a report can decide and exits with status 1 if any of them fails.

Targets (ratios measured side by side in one run):

* rollout: c/b >= 1.0, where c is the PPO agent through ``TextGenVectorEnv`` and b the monolithic
  ``generate`` + reference forward + reward forward pipeline; checked for the full fine-tune (``c/b``)
  and for LoRA with the fused reference (``c_fused/b_lora``: same LoRA policy in both pipelines, and
  ``c_fused/b``: against the plain model's pipeline), eager and with CUDA graphs (``c_graphs``,
  ``c_fused_graphs``); stretch c/b >= 2 on GPUs with CUDA graphs.
* c/d >= 10 at 128 new tokens or more (d: per-token full forward without cache).
* c/f >= 0.90: the environment within 10% of the floor (f: the unavoidable work, one cached forward of the
  policy and one of the reference per token, sampling, the reward model at the end), eager (``c/f``) and
  with CUDA graphs against the floor with CUDA graphs (``c_graphs/f_graphs``).
* peak memory with the LoRA (adapter-disabled) reference <= 1.15x that of the LoRA policy alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _checks(report: dict) -> list[tuple[str, float, float]]:
    """(description, value, threshold) of every target this report can decide."""
    s = report["settings"]
    ratios = report.get("ratios", {})
    out = []
    rollout = (
        "c/b",
        "c_fused/b_lora",
        "c_fused/b",
        "c_graphs/b",
        "c_fused_graphs/b_lora",
        "c_fused_graphs/b",
    )
    for label in rollout:
        if label in ratios:
            out.append((f"rollout {label} >= 1.0", ratios[label], 1.0))
    for label in ("c/f", "c_graphs/f_graphs"):
        if label in ratios:
            out.append((f"rollout {label} >= 0.90 (within 10% of the floor)", ratios[label], 0.90))
    if report["environment"]["device"].startswith("cuda"):
        for label in ("c_graphs/b", "c_fused_graphs/b_lora"):
            if label in ratios:
                out.append((f"stretch: rollout {label} >= 2.0", ratios[label], 2.0))
    if s["new_tokens"] >= 128:
        for label in ("c/d", "c_fused/d", "c_graphs/d"):
            if label in ratios:
                out.append((f"{label} >= 10 at {s['new_tokens']} new tokens", ratios[label], 10.0))
    memory = report.get("lora_memory", {})
    for label in ("adapter_disabled_reference", "fused_reference"):
        if label in memory:
            value = memory[label]["ratio_to_policy_alone"]
            out.append((f"peak memory {label} / policy alone <= 1.15", 1.15 / value, 1.0))
    return out


def main(paths: list[str]) -> int:
    failed = 0
    for path in paths:
        report = json.loads(Path(path).read_text())
        s, env = report["settings"], report["environment"]
        where = env.get("gpu", env["cpu"])
        print(
            f"{Path(path).name}: {s['shape']}, batch {s['batch_size']}, prompt {s['prompt_length']}, "
            f"{s['new_tokens']} new tokens, {s['dtype']} on {where}"
        )
        load = report.get("max_other_load")
        if load is not None and load == load and load > 0.2:
            print(f"  note: other processes used up to {load:.1f} CPU cores during a timed run")
        for description, value, threshold in _checks(report):
            ok = value >= threshold
            failed += not ok
            shown = value if "memory" not in description else 1.15 / value
            print(f"  {'PASS' if ok else 'FAIL'}  {description}: {shown:.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
