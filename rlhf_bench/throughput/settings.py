"""The options of ``llm-env bench-throughput``: one flag per field of :class:`ThroughputSettings`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_bench.throughput.models import SHAPES
from rlhf_bench.throughput.variants import LORA_VARIANTS, VARIANTS

__all__ = ["ThroughputSettings"]

DTypeName = Literal["float32", "bfloat16", "float16"]


@dataclass
class ThroughputSettings:
    """Options of the benchmark; ``llm-env bench-throughput`` has one flag per field."""

    shape: str = field(default="gpt2-small", metadata={"choices": SHAPES})
    """Policy and reference shape (random weights): tiny, gpt2-small (6 x 384, vocab 50257), gpt2-124m
    (12 x 768), llama-1b (16 x 2048, GQA 32/8 heads, MLP 5632, vocab 32000)."""
    reward_shape: str | None = field(default=None, metadata={"choices": SHAPES})
    """Shape of the reward model (a sequence classifier on the policy's vocabulary); default: ``shape``."""
    batch_size: int = 16
    """B: episodes generated in parallel."""
    prompt_length: int = 32
    """Prompt tokens per episode (every prompt has exactly this length)."""
    new_tokens: int = 48
    """Generated tokens per episode (exactly: no stop token)."""
    dtype: DTypeName = "float32"
    """Model dtype (bfloat16 on GPUs)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto."""
    repeats: int = 3
    """Timed runs per variant; the median is reported."""
    warmup: int = 1
    """Untimed runs per variant before the timed ones (the first one also measures peak memory)."""
    no_cache_repeats: int = 1
    """Timed runs of the slow no-cache variant; with 1 it has no warm-up run either."""
    threads: int | None = 2
    """torch.set_num_threads for the run; none keeps PyTorch's default."""
    variants: tuple[str, ...] | None = None
    """Which variants run (space- or comma-separated); default: all, less the CUDA-graph ones on CPU and the
    peers (trl-grpo, torchrl: optional packages, pip install -e ".[peers]"), which run when named."""
    temperature: float = 1.0
    """Sampling temperature of every variant."""
    kl_coef: float = 0.05
    """beta of the per-token KL reward."""
    lora_rank: int = 16
    """Rank of the LoRA variants' adapters (on all linear layers)."""
    ppo_epochs: int = 1
    """PPO epochs per update in the ppo-update measurement."""
    seed: int = 0
    """Seed of the weights, the prompts and sampling."""
    memory_isolation: bool = True
    """On CPU, measure each setup of the lora-memory comparison in a fresh process."""

    def __post_init__(self) -> None:
        if self.variants is None:
            return self._check()
        variants = tuple(v.strip() for item in self.variants for v in str(item).split(",") if v.strip())
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        if not variants:
            raise ValueError(f"choose at least one variant from {', '.join(VARIANTS)}")
        self.variants = tuple(v for v in VARIANTS if v in variants)  # canonical order
        self._check()

    def _check(self) -> None:
        for name in ("shape", "reward_shape"):
            value = getattr(self, name)
            if value is not None and value not in SHAPES:
                raise ValueError(f"{name} must be one of {', '.join(SHAPES)}, got {value!r}")
        for name in (
            "batch_size",
            "prompt_length",
            "new_tokens",
            "repeats",
            "no_cache_repeats",
            "ppo_epochs",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lora_rank < 1 and set(LORA_VARIANTS) & set(self.variants or VARIANTS):
            raise ValueError("the LoRA variants need lora_rank >= 1")
