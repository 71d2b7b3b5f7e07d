"""Advantage estimation and the policy-gradient losses, as plain functions on (N, T) tensors with a token mask.

PPO's means are over the real tokens of the batch (``mask``), the convention of TRL's PPO trainer. The
critic-free agents (:mod:`agents.pg`) share the clipped surrogate (:func:`clipped_surrogate`, with the
asymmetric clip of DAPO) and differ in how they average it over tokens and sequences
(:func:`aggregate_loss`).
"""

from __future__ import annotations

import torch

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate_loss",
    "clipped_surrogate",
    "explained_variance",
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "value_loss",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum().to(x.dtype)
        var = var * count / (count - 1).clamp(min=1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over the masked positions; padding stays 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016), per right-padded episode.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V = 0`` after the last token (the episode ends
    there: termination by EOS or truncation at the response budget, both final in RLHF), and
    ``A_t = delta_t + gamma * lam * A_{t+1}``. Returns ``(advantages, returns = advantages + values)``.
    """
    maskf = mask.to(rewards.dtype)
    values = values * maskf
    rewards = rewards * maskf
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * maskf[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * maskf


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate ``-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with
    ``rho = exp(logprobs - old_logprobs)`` (Schulman et al. 2017, eq. 7, negated for minimisation).

    ``clip_high`` (default ``clip_low``) is DAPO's clip-higher (Yu et al. 2025): a wider upper bound lets
    the probability of unlikely tokens with a positive advantage grow. Returns ``(loss, ratio, clipped)``,
    each shaped like the inputs; ``clipped`` marks the tokens where the clipped term is the active one.
    """
    clip_high = clip_low if clip_high is None else clip_high
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
"""How a per-token loss becomes a scalar, the choice that separates GRPO, Dr. GRPO, DAPO and REINFORCE."""


def aggregate_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_sequences: int | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``values`` (N, T) over the real tokens ``mask`` to a scalar.

    * ``"token-mean"``: sum over every token of the batch / number of tokens (DAPO, Yu et al. 2025: long
      responses weigh as much per token as short ones);
    * ``"seq-mean-token-mean"``: mean over the tokens of each response, then over responses (GRPO, Shao
      et al. 2024: ``1/G sum_i 1/|y_i| sum_t``);
    * ``"seq-mean-token-sum"``: sum over the tokens of each response, mean over responses (REINFORCE on
      the sequence log-probability: RLOO, Ahmadian et al. 2024; ReMax, Li et al. 2023);
    * ``"seq-mean-token-sum-norm"``: the token sum divided by the constant ``max_length`` instead of
      ``|y_i|``, then the mean over responses (Dr. GRPO, Liu et al. 2025: no length bias).

    ``num_sequences`` and ``num_tokens`` default to those of this batch; pass the totals of the whole
    minibatch when ``values`` is one micro-batch of it, so that the micro-batch losses add up to the
    minibatch loss exactly (gradient accumulation).
    """
    maskf = mask.to(values.dtype)
    total = values * maskf
    sequences = float(values.shape[0] if num_sequences is None else num_sequences)
    if mode == "token-mean":
        tokens = maskf.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=values.dtype)
        return total.sum() / tokens.clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        return (total.sum(dim=1) / maskf.sum(dim=1).clamp(min=1.0)).sum() / sequences
    if mode == "seq-mean-token-sum":
        return total.sum() / sequences
    if mode == "seq-mean-token-sum-norm":
        if max_length is None or max_length < 1:
            raise ValueError(f"'seq-mean-token-sum-norm' needs max_length >= 1, got {max_length}")
        return total.sum() / (sequences * max_length)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation, averaged over tokens.

    Also returns the clip fraction and ``approx_kl = E[(r - 1) - log r]`` (the k3 estimator of
    KL(old || new), http://joschu.net/blog/kl-approx.html).
    """
    per_token, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low=clip_range)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(ratio - 1.0 - (logprobs - old_logprobs), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
) -> torch.Tensor:
    """``0.5 * E[max((V - R)^2, (V_clip - R)^2)]`` with ``V_clip = V_old + clip(V - V_old, -c, c)``.

    Value clipping as in OpenAI baselines' PPO2 and TRL; ``clip_range=None`` gives the plain squared error.
    """
    error = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)``: 1 is a perfect value function, 0 is no better than a constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
