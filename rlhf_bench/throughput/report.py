"""What a throughput report says: the machine and versions it ran on, and its Markdown tables."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import gymnasium
import numpy as np
import peft
import torch
import transformers

from rlhf_bench.throughput.peers import peer_versions

__all__ = ["environment", "format_report"]


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and the versions a report was measured with."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gymnasium": gymnasium.__version__,
        "numpy": np.__version__,
        **peer_versions(),  # trl, accelerate, torchrl, tensordict where installed
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    s = report["settings"]
    env = report["environment"]
    where = env.get("gpu", env["cpu"])
    lines = [
        f"{s['shape']} shape, batch {s['batch_size']}, prompt {s['prompt_length']}, {s['new_tokens']} new tokens, "
        f"{s['dtype']}, {where} ({env['device']}, {env.get('processes', 1)} process(es) x "
        f"{env['torch_threads']} threads; batch per process); "
        f"median of {s['repeats']} timed runs ({s['no_cache_repeats']} for no-cache)",
    ]
    if report["variants"]:
        floor = "floor" in report["variants"]
        lines += [
            "",
            "| variant | tokens/s | median s | peak memory (MiB) | weights (MiB) |"
            + (" vs floor | vs floor, CPU time |" if floor else ""),
            "|---|---:|---:|---:|---:|" + ("---:|---:|" if floor else ""),
        ]
        for name, r in report["variants"].items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['median_seconds']:.3f} | "
                f"{r['peak_memory_bytes'] / 2**20:,.0f} | {r['model_bytes'] / 2**20:,.0f} |"
                + (f" {r['ratio_to_floor']:.2f} | {r['ratio_to_floor_cpu']:.2f} |" if floor else "")
            )
    if report["ratios"]:
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {label} | {value:.2f} |" for label, value in report["ratios"].items()]
    if "ppo_update" in report:
        lines += ["", "| PPO update | tokens/s per epoch |", "|---|---:|"]
        lines += [f"| {k} | {v['tokens_per_s_per_epoch']:,.0f} |" for k, v in report["ppo_update"].items()]
    if "lora_memory" in report:
        lines += [
            "",
            "| LoRA memory (rollout + update) | peak (MiB) | vs policy alone | weights (MiB) |",
            "|---|---:|---:|---:|",
        ]
        for label, v in report["lora_memory"].items():
            if isinstance(v, dict):
                lines.append(
                    f"| {label} | {v['peak_memory_bytes'] / 2**20:,.0f} | "
                    f"{v.get('ratio_to_policy_alone', 1.0):.2f} | {v['model_bytes'] / 2**20:,.0f} |"
                )
    for reason in report.get("skipped", {}).values():
        lines += ["", f"Skipped: {reason}."]
    if "load_average_start" in report:
        lines += [
            "",
            f"Load average (1 min): {report['load_average_start']:.2f} at the start, "
            f"{report.get('load_average_end', float('nan')):.2f} at the end.",
        ]
    load = report.get("max_other_load", float("nan"))
    if load == load and load > 0.2:
        lines += ["", f"WARNING: other processes used up to {load:.1f} CPU cores during a timed run."]
    return "\n".join(lines)
