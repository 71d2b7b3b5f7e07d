"""KL-coefficient controllers (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

The coefficient beta multiplies the per-token KL penalty that the environment puts in the reward; the agent
updates it after each rollout and writes it back through ``env.kl_coef``.
"""

from __future__ import annotations

import math
from typing import Any

from llm_env.kl import check_kl_coef

__all__ = ["AdaptiveKLController", "FixedKLController"]


class FixedKLController:
    """A constant beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = check_kl_coef(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """The coefficient for the next rollout, given the last one's KL and episode count: here unchanged.

        Args:
            current_kl: Mean summed KL per episode of the last rollout.
            n_steps: Number of episodes in the last rollout.

        Returns:
            The new beta, also kept in ``value``.
        """
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The controller's state for a checkpoint: the current beta."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the beta saved by :meth:`state_dict` (a resumed run continues with the adapted value)."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional control of beta towards a target KL (Ziegler et al. 2019, section 2.2).

    ``beta <- beta * (1 + clip((KL - target) / target, -0.2, 0.2) * n_steps / horizon)``, with KL the mean
    summed KL per episode of the last rollout and ``n_steps`` the number of episodes in it.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        if not target > 0:
            raise ValueError(f"the KL target must be > 0, got {target}")
        if horizon < 1:
            raise ValueError(f"the KL horizon must be >= 1, got {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta towards the target by the proportional rule above; a non-finite KL leaves it unchanged.

        Args:
            current_kl: Mean summed KL per episode of the last rollout.
            n_steps: Number of episodes in the last rollout.

        Returns:
            The new beta, also kept in ``value``.
        """
        if math.isfinite(current_kl):
            error = min(max((current_kl - self.target) / self.target, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
