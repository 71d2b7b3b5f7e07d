"""KL estimators and the one check of a KL coefficient.

Every estimator is a function of ``d = log pi(a|s) - log pi_ref(a|s)`` for an action ``a`` sampled from pi,
whose expectation under pi is (or approximates) ``KL(pi || pi_ref)`` (Schulman, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html):

* ``k1 = d``: unbiased, high variance, negative on some samples;
* ``k2 = d^2 / 2``: biased, low variance, never negative;
* ``k3 = exp(-d) - 1 + d``: unbiased and never negative (GRPO's choice, Shao et al. 2024).

The environment pays ``-beta * k(d_t)`` per token with the estimator named in ``EnvConfig.kl_estimator``;
agents that put the KL in their loss instead use the same functions. Adding an estimator is one decorated
function: its name becomes a valid ``kl_estimator`` value (and a command-line choice) everywhere::

    @register_kl_estimator("abs")
    def absolute(d):
        return d.abs()
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["KL_ESTIMATORS", "check_kl_coef", "check_kl_estimator", "kl_penalty", "register_kl_estimator"]

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
"""Estimator name -> function of ``d = logp - ref_logp`` (elementwise). The allowed values of every
``kl_estimator`` option are this dictionary's keys."""


def register_kl_estimator(
    name: str,
) -> Callable[[Callable[[torch.Tensor], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
    """Decorator adding ``fn(d) -> estimate`` (elementwise on a tensor) to :data:`KL_ESTIMATORS`."""
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"a KL estimator name must be a non-empty string without spaces, got {name!r}")

    def decorate(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        KL_ESTIMATORS[name] = fn
        return fn

    return decorate


@register_kl_estimator("k1")
def k1(d: torch.Tensor) -> torch.Tensor:
    """``d``: the log-ratio itself (unbiased)."""
    return d


@register_kl_estimator("k2")
def k2(d: torch.Tensor) -> torch.Tensor:
    """``d^2 / 2`` (biased, low variance)."""
    return 0.5 * d * d


@register_kl_estimator("k3")
def k3(d: torch.Tensor) -> torch.Tensor:
    """``exp(-d) - 1 + d`` (unbiased, non-negative); ``expm1`` keeps it exact for small ``d``."""
    return torch.expm1(-d) + d


def check_kl_estimator(name: Any) -> str:
    """Return ``name`` if it names a registered estimator, else raise listing the registered ones."""
    if not isinstance(name, str) or name not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {name!r}")
    return name


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probabilities of actions sampled from pi."""
    return KL_ESTIMATORS[check_kl_estimator(estimator)](logprobs - ref_logprobs)


def check_kl_coef(value: Any, *, has_reference: bool = True) -> float:
    """``value`` as a float if it is a usable KL coefficient beta (finite, >= 0; 0 without a reference)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {value!r}")
    if value > 0 and not has_reference:
        raise ValueError(f"kl_coef={value} needs a reference model: pass reference=... or set kl_coef=0")
    return float(value)
