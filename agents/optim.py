"""Re-exports :mod:`llm_env.training` (the optimizer and schedule helpers every trainer shares)."""

from llm_env.training import Schedule, make_optimizer, make_scheduler, trainable_parameters

__all__ = ["Schedule", "make_optimizer", "make_scheduler", "trainable_parameters"]
