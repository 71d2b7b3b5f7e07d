"""rewards: train and serve reward models for RLHF.

A reward model ``r(prompt, response)`` is a transformers backbone with a scalar head, trained on human (or
simulated) preferences and used as the reward of :class:`llm_env.TextGenEnv`:

* :class:`RewardModel` scores texts at the last real token, saves as a plain sequence-classification
  checkpoint plus ``reward_model.json`` (score statistics for whitening), and is itself a valid ``reward=``;
* :mod:`rewards.losses`: Bradley-Terry (InstructGPT), Llama 2's margin loss with its two margin tables,
  InstructGPT's K-way ranking loss, reward centering;
* :mod:`rewards.data`: JSONL / ``datasets`` preference pairs (with Llama 2 levels or margins) and rankings,
  validated with the line and field of every problem;
* :func:`train_reward_model` with :class:`RewardTrainingConfig` (Llama 2's recipe), and
  :func:`evaluate_reward_model` (accuracy overall and per preference level);
* :class:`Llama2Reward`: Llama 2's helpfulness + safety combination as one reward source;
* :func:`simulate_preferences` / :func:`simulate_rankings`: Bradley-Terry / Plackett-Luce annotators over a
  gold score (Gao et al. 2022), so any task gets preference data without humans.

The command line ``llm-env train-rm --data FILE --model PATH --out DIR`` wraps the trainer.
"""

from rewards.annotators import simulate_preferences, simulate_rankings
from rewards.combine import Llama2Reward, llama2_select
from rewards.data import Comparison, load_preferences, save_preferences, split_by_prompt
from rewards.losses import (
    LEVELS,
    MARGIN_TABLES,
    bradley_terry_loss,
    centering_penalty,
    comparison_loss,
    level_margins,
    llama2_margin_loss,
    normalize_level,
    ranking_loss,
)
from rewards.model import RewardModel, ScoreStats, load_reward_model
from rewards.train import RewardTrainingConfig, TrainResult, evaluate_reward_model, train_reward_model

__all__ = [
    "LEVELS",
    "MARGIN_TABLES",
    "Comparison",
    "Llama2Reward",
    "RewardModel",
    "RewardTrainingConfig",
    "ScoreStats",
    "TrainResult",
    "bradley_terry_loss",
    "centering_penalty",
    "comparison_loss",
    "evaluate_reward_model",
    "level_margins",
    "llama2_margin_loss",
    "llama2_select",
    "load_preferences",
    "load_reward_model",
    "normalize_level",
    "ranking_loss",
    "save_preferences",
    "simulate_preferences",
    "simulate_rankings",
    "split_by_prompt",
    "train_reward_model",
]
