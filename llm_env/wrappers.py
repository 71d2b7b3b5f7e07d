"""Gymnasium's numpy vector wrappers on :class:`~llm_env.TextGenVectorEnv`.

The native vector environment returns torch tensors on its device, which is what a GPU agent wants and
what Gymnasium's numpy-based vector wrappers (``RecordEpisodeStatistics``, ``NormalizeReward``,
``ClipReward``, ...) cannot take: they add the rewards into numpy arrays. :class:`TorchToNumpy` is the
one-line conversion in between. Gymnasium 1.4 ships converters from numpy and from JAX
(``NumpyToTorch``, ``JaxToNumpy``) but none from torch; its generic ``ArrayConversion`` needs the optional
``array-api-compat`` package and converts the info too, whose text fields (the completion's prompt and
response) DLPack cannot carry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium.utils import RecordConstructorArgs
from gymnasium.vector import VectorEnv, VectorWrapper

__all__ = ["TorchToNumpy"]


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {key: _to_numpy(item) for key, item in value.items()}
    return value


class TorchToNumpy(VectorWrapper, RecordConstructorArgs):
    """A :class:`~llm_env.TextGenVectorEnv` with numpy observations, rewards and flags on the host.

    Observations are ``int64`` arrays, rewards ``float64`` and terminations / truncations ``bool``, as
    ``SyncVectorEnv`` over :class:`~llm_env.TextGenEnv` returns them, so Gymnasium's numpy vector wrappers
    and loggers work unchanged on top. Actions pass through untouched: token ids (numpy, lists or torch)
    and ``TokenActions(tokens, logprobs)`` alike, and ``info`` is already numpy. Reset options
    (``reset_mask``, ``prompt_indices``) pass through too.

    Use it for wrappers, logging and CPU agents. An agent that acts on the device keeps the native
    environment (no copy of the observations to the host, and the fused policy logits of
    :meth:`~llm_env.TextGenVectorEnv.policy_logits` need the environment's own observation tensor).

    Example::

        >>> from gymnasium.wrappers.vector import RecordEpisodeStatistics
        >>> native = gymnasium.make_vec("llm_env/TextGen-v0", num_envs=8, prompts=prompts,
        ...                             reference="path/to/sft", reward=scorer)          # doctest: +SKIP
        >>> envs = RecordEpisodeStatistics(TorchToNumpy(native))                          # doctest: +SKIP
    """

    def __init__(self, env: VectorEnv) -> None:
        RecordConstructorArgs.__init__(self)
        VectorWrapper.__init__(self, env)

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:meth:`~llm_env.TextGenVectorEnv.reset` (same seeds and options) with numpy observations."""
        obs, info = self.env.reset(seed=seed, options=options)
        return _to_numpy(obs), info

    def step(
        self, actions: Any
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """:meth:`~llm_env.TextGenVectorEnv.step` with numpy observations (``int64``), rewards
        (``float64``) and terminations / truncations (``bool``); actions and info pass through."""
        obs, rewards, terminations, truncations, info = self.env.step(actions)
        return (
            _to_numpy(obs),
            _to_numpy(rewards).astype(np.float64),
            _to_numpy(terminations).astype(bool),
            _to_numpy(truncations).astype(bool),
            info,
        )
