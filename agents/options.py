"""The options every on-policy trainer shares: AdamW and its schedule, LoRA, scale-out, seed and logging.

:class:`~agents.ppo.PPOConfig` and :class:`~agents.pg.PGConfig` (and through it every critic-free agent's
config) subclass :class:`OnPolicyOptions`; each redefines the fields whose default or meaning differs (the
learning rate, the schedule's reference) and adds its algorithm's own knobs after these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llm_env.distributed import Strategy

__all__ = ["OnPolicyOptions"]


@dataclass
class OnPolicyOptions:
    """Optimizer, LoRA, data-parallel strategy, seed and logging of an agent that trains on its own rollouts."""

    learning_rate: float = 1e-5
    """AdamW learning rate (tiny models need ~1e-3)."""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (Llama 2)."""
    adam_eps: float = 1e-5
    """AdamW epsilon (Llama 2)."""
    weight_decay: float = 0.0
    """AdamW weight decay (Llama 2: 0.1)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (Llama 2: 1.0)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over the updates of ``train`` (decaying ones need ``total_updates``)."""
    warmup_updates: int = 0
    """Updates of linear learning-rate warmup."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank; the reference is then the base with adapters disabled (0: full)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (default 2 * rank)."""
    lora_target_modules: str | tuple[str, ...] = "all-linear"
    """Modules that receive LoRA adapters."""
    fuse_reference: bool = True
    """With LoRA, let the environment decode the policy and its adapter-disabled reference in one forward
    pass over 2B rows (``AdapterDisabled(policy, fuse=True)``) and act from the policy half instead of a
    second decode: same tokens, log-probabilities and rewards up to float rounding, one pass over the base
    weights per token instead of two (see :class:`llm_env.fused.FusedDecoder`; 1.34x faster rollouts on
    2 CPU cores). Ignored without LoRA."""
    cuda_graphs: bool = False
    """Replay the decode steps of the agent's sampler and of environments built by its ``make_env`` as CUDA
    graphs (CUDA only; see :class:`llm_env.IncrementalLM`)."""
    strategy: Strategy = "ddp"
    """On several processes (torchrun): "ddp" keeps a replica of the policy per rank and averages gradients
    (DistributedDataParallel); "fsdp" shards parameters, gradients and optimizer state across ranks (FSDP2
    ``fully_shard``) for a policy whose training state does not fit one device (rollouts gather the full
    weights, which must fit one device). Works with LoRA; ignored in one process."""
    seed: int = 0
    """Seed of everything random: rollout prompts, sampling, minibatch order."""
    log_dir: str | None = None
    """Write TensorBoard logs here."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_updates < 0:
            raise ValueError("warmup_updates must be >= 0")
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0 (0 disables LoRA)")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = tuple(self.lora_target_modules)
