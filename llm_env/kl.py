"""KL estimators, where each one is sound to pay, and the one check of a KL coefficient.

Every estimator is a function of ``d = log pi(a|s) - log pi_ref(a|s)`` for an action ``a`` sampled from pi,
whose expectation under pi is (or approximates) ``KL(pi || pi_ref)`` (Schulman, "Approximating KL
Divergence", http://joschu.net/blog/kl-approx.html):

* ``k1 = d``: unbiased, high variance, negative on some samples;
* ``k2 = d^2 / 2``: biased, low variance, never negative;
* ``k3 = exp(-d) - 1 + d``: unbiased and never negative (GRPO's choice, Shao et al. 2024).

An unbiased *value* is not an unbiased *gradient* (Tang & Munos 2025, "On a few pitfalls in KL divergence
gradient estimation for RL", arXiv 2506.09477), and what the gradient is depends on where the estimate is
paid. With ``grad KL(pi || pi_ref) = E_pi[d grad log pi]``:

* **in the reward** (the environment pays ``-beta * k(d)``, a number without gradient) the policy gradient is
  the score-function one, ``E_pi[k(d) grad log pi]``: exact for k1; for k2 it is ``E_pi[d^2/2 grad log pi]``
  and for k3 ``grad KL(pi || pi_ref) - grad KL(pi_ref || pi)``, neither of them the KL's;
* **in the loss** (autograd through ``log pi`` of sampled actions, on-policy) it is the pathwise one,
  ``E_pi[k'(d) grad log pi]``: exact for k2 (``k2' = d``); zero in expectation for k1 (``E_pi[grad log pi]
  = 0``: the term only adds noise); for k3 (``k3' = 1 - pi_ref/pi``) the gradient of the other direction,
  ``KL(pi_ref || pi)``, which agrees with ``KL(pi || pi_ref)``'s only to first order near ``pi = pi_ref``.

So **k1 in the reward and k2 in the loss** are the sound combinations (:data:`UNBIASED_KL_ESTIMATOR`); the
others are in :data:`KL_GRADIENT_BIAS`, and :func:`warn_kl_gradient_bias` warns about them. (For sequences
the token-level loss also leaves out how a token changes the states after it, as Tang & Munos show; the KL
in the reward, summed into the return, does not.)

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
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "KL_ESTIMATORS",
    "KL_GRADIENT_BIAS",
    "UNBIASED_KL_ESTIMATOR",
    "KLGradientBiasWarning",
    "check_kl_coef",
    "check_kl_estimator",
    "kl_penalty",
    "register_kl_estimator",
    "warn_kl_gradient_bias",
]

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
"""Estimator name -> function of ``d = logp - ref_logp`` (elementwise). The allowed values of every
``kl_estimator`` option are this dictionary's keys.

:meta hide-value:
"""


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


KLPlacement = Literal["reward", "loss"]
"""Where a KL estimate is paid: as a reward (score-function gradient) or in the loss (pathwise gradient)."""

UNBIASED_KL_ESTIMATOR: dict[str, str] = {"reward": "k1", "loss": "k2"}
"""Placement -> the registered estimator whose expected policy gradient there is exactly
``grad KL(pi || pi_ref)``: k1 as a reward, k2 in the loss (see the module docstring). The default of an
agent's ``kl_estimator`` left to ``None``."""

KL_GRADIENT_BIAS: dict[tuple[str, str], str] = {
    ("k1", "loss"): "its gradient in the loss, E_pi[grad log pi], is zero in expectation: the term only adds "
    "noise and does not pull the policy towards the reference",
    ("k2", "reward"): "as a reward its score-function gradient E_pi[d^2/2 grad log pi] is not grad KL",
    ("k3", "reward"): "as a reward its score-function gradient E_pi[k3 grad log pi] is "
    "grad KL(pi || pi_ref) - grad KL(pi_ref || pi), not grad KL(pi || pi_ref)",
    ("k3", "loss"): "its gradient in the loss, E_pi[(1 - pi_ref/pi) grad log pi], is grad KL(pi_ref || pi), "
    "the other direction of the KL, equal to grad KL(pi || pi_ref) only to first order near the reference "
    "(DeepSeekMath's choice, Shao et al. 2024)",
}
"""(estimator, placement) -> why its expected gradient there is not ``grad KL(pi || pi_ref)`` (Tang & Munos
2025). Combinations not listed are unbiased (:data:`UNBIASED_KL_ESTIMATOR`) or not analysed (an estimator
registered later: add its biased placements here)."""


class KLGradientBiasWarning(UserWarning):
    """A KL estimator paid where its expected gradient is not that of ``KL(pi || pi_ref)``."""


def warn_kl_gradient_bias(estimator: str, kl_in: KLPlacement) -> bool:
    """Warn (:class:`KLGradientBiasWarning`) if paying ``estimator`` in ``kl_in`` (``"reward"`` or
    ``"loss"``) gives a biased gradient of ``KL(pi || pi_ref)``; return whether it did. The combination still
    runs: papers used some of them on purpose (GRPO's k3 in the loss), and reproducing them is legitimate.
    The warning names the user's line that asked for it (the first caller outside the project's packages),
    not the library's line that noticed."""
    why = KL_GRADIENT_BIAS.get((estimator, kl_in))
    if why is None:
        return False
    sound = UNBIASED_KL_ESTIMATOR[kl_in]
    warnings.warn(
        f"kl_estimator={estimator!r} with kl_in={kl_in!r} is a biased gradient of KL(pi || pi_ref): {why} "
        f"(Tang & Munos 2025, http://joschu.net/blog/kl-approx.html). For the KL's gradient use "
        f"kl_estimator={sound!r} with kl_in={kl_in!r} (the default, kl_estimator=None), or "
        f"{'k2 with the KL in the loss' if kl_in == 'reward' else 'k1 with the KL in the reward'}.",
        KLGradientBiasWarning,
        stacklevel=_user_stacklevel(),
    )
    return True


_PROJECT_PACKAGES = tuple(
    str(Path(__file__).resolve().parent.parent / name)
    for name in ("llm_env", "agents", "rewards", "rlhf_bench")
)


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, called from :func:`warn_kl_gradient_bias`, that points at the first frame
    outside the project's packages (dataclass ``__init__`` frames, file ``<string>``, count as inside)."""
    frame, level = sys._getframe(2), 2  # 1: warn_kl_gradient_bias, 2: its caller
    while frame is not None and (
        frame.f_code.co_filename == "<string>"
        or str(Path(frame.f_code.co_filename).resolve()).startswith(_PROJECT_PACKAGES)
    ):
        frame, level = frame.f_back, level + 1
    return level


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
