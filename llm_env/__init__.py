"""llm_env: RLHF of language models as an ordinary Gymnasium environment.

The vocabulary is the action space, the prompt plus the text so far is the observation, and the reward
is a trained reward model's score minus a KL penalty to the SFT reference, computed inside the
environment. ``TextGenEnv`` is the single-episode environment (numpy, for Gymnasium and
Stable-Baselines3 tooling); ``TextGenVectorEnv`` steps B episodes on a device with torch tensors.

Registered ids: ``gymnasium.make("llm_env/TextGen-v0", ...)`` and
``gymnasium.make_vec("llm_env/TextGen-v0", num_envs=B, ...)`` (native vector env; wrap it in
``TorchToNumpy`` for Gymnasium's numpy vector wrappers such as ``RecordEpisodeStatistics``).
"""

from __future__ import annotations

import gymnasium

from llm_env.attention import UnsupportedArchitectureError
from llm_env.config import AdapterDisabled, EnvConfig
from llm_env.core import EpisodeBatch, TokenActions
from llm_env.decoding import IncrementalLM, SlotCache
from llm_env.envs import TextGenEnv, TextGenVectorEnv
from llm_env.fused import FusedDecoder
from llm_env.kl import KL_ESTIMATORS, kl_penalty, register_kl_estimator
from llm_env.prompts import load_prompts
from llm_env.reward import SequenceClassifierReward
from llm_env.wrappers import TorchToNumpy

__all__ = [
    "KL_ESTIMATORS",
    "AdapterDisabled",
    "EnvConfig",
    "EpisodeBatch",
    "FusedDecoder",
    "IncrementalLM",
    "SequenceClassifierReward",
    "SlotCache",
    "TextGenEnv",
    "TextGenVectorEnv",
    "TokenActions",
    "TorchToNumpy",
    "UnsupportedArchitectureError",
    "kl_penalty",
    "load_prompts",
    "register_kl_estimator",
]

__version__ = "0.1.0"

ENV_ID = "llm_env/TextGen-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        id=ENV_ID,
        entry_point="llm_env.envs:TextGenEnv",
        vector_entry_point="llm_env.envs:TextGenVectorEnv",
    )
