"""agents: token-level PPO, critic-free policy gradients, rejection sampling and SFT that act through
:class:`llm_env.TextGenVectorEnv`.

* :class:`Agent` / :func:`collect_episodes`: the protocol any agent implements and the loop that runs it
  (an unbiased sample: every episode it starts is collected, long or short).
* :class:`PPOAgent` (+ :class:`PPOConfig`): PPO with GAE, clipped policy/value losses, adaptive KL, PPO-ptx,
  LoRA with the adapter-disabled base as reference, checkpoint and resume.
* The critic-free agents on one core (:mod:`agents.pg`): :class:`GRPOAgent`, :class:`DrGRPOAgent`,
  :class:`DAPOAgent`, :class:`GSPOAgent`, :class:`RLOOAgent`, :class:`ReinforcePPAgent`, :class:`ReMaxAgent`,
  each with its config; the KL in the reward or in the loss; a budget of sampled tokens.
* :class:`RejectionSamplingAgent`: Llama 2's best-of-k sampling and fine-tuning, with the best-of-k KL.
* :func:`sft_train`: supervised fine-tuning with the loss on response tokens only.
* :class:`DPOAgent` (+ :class:`DPOConfig`, :func:`dpo_loss`): offline DPO (Rafailov et al. 2023) and IPO
  (Azar et al. 2023) on preference pairs, against the frozen (or adapter-disabled LoRA) reference.
* :class:`OnlineDPOAgent` (+ :class:`OnlineDPOConfig`): online DPO (Guo et al. 2024), two samples per prompt
  through the environment, ranked by the reward model.
* :func:`iterative_rlhf`: rejection-sampling rounds V1..Vn, then PPO (Llama 2).
* :class:`LMActorCriticPolicy`: lets unmodified Stable-Baselines3 PPO train a transformers LM on TextGenEnv.
"""

from agents.dapo import DAPOAgent, DAPOConfig
from agents.dpo import DPOAgent, DPOConfig, dpo_loss, load_preference_pairs
from agents.dr_grpo import DrGRPOAgent, DrGRPOConfig
from agents.grpo import GRPOAgent, GRPOConfig
from agents.gspo import GSPOAgent, GSPOConfig
from agents.kl_controllers import AdaptiveKLController, FixedKLController
from agents.losses import (
    aggregate_loss,
    clipped_surrogate,
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
from agents.pg import PGAgent, PGConfig
from agents.pipeline import IterativeConfig, IterativeResult, iterative_rlhf
from agents.policy import (
    SequenceBatch,
    TokenSampler,
    ValueHead,
    add_lora,
    response_forward,
    sample_tokens,
    save_policy,
)
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce_pp import ReinforcePPAgent, ReinforcePPConfig
from agents.rejection import (
    RejectionSamplingAgent,
    RejectionSamplingConfig,
    best_of_k_kl,
    best_of_k_kl_theory,
)
from agents.remax import ReMaxAgent, ReMaxConfig
from agents.rloo import RLOOAgent, RLOOConfig
from agents.rollout import Agent, LearningAgent, Trajectories, collect_episodes
from agents.sb3 import LMActorCriticPolicy, LMFeaturesExtractor
from agents.sft import SFTConfig, load_sft_data, sft_loss, sft_train, tokenize_pairs

__all__ = [
    "AdaptiveKLController",
    "Agent",
    "DAPOAgent",
    "DAPOConfig",
    "DPOAgent",
    "DPOConfig",
    "DrGRPOAgent",
    "DrGRPOConfig",
    "FixedKLController",
    "GRPOAgent",
    "GRPOConfig",
    "GSPOAgent",
    "GSPOConfig",
    "IterativeConfig",
    "IterativeResult",
    "LMActorCriticPolicy",
    "LMFeaturesExtractor",
    "LearningAgent",
    "OnlineDPOAgent",
    "OnlineDPOConfig",
    "PGAgent",
    "PGConfig",
    "PPOAgent",
    "PPOConfig",
    "RLOOAgent",
    "RLOOConfig",
    "ReMaxAgent",
    "ReMaxConfig",
    "ReinforcePPAgent",
    "ReinforcePPConfig",
    "RejectionSamplingAgent",
    "RejectionSamplingConfig",
    "SFTConfig",
    "SequenceBatch",
    "TokenSampler",
    "Trajectories",
    "ValueHead",
    "add_lora",
    "aggregate_loss",
    "best_of_k_kl",
    "best_of_k_kl_theory",
    "clipped_surrogate",
    "collect_episodes",
    "dpo_loss",
    "explained_variance",
    "gae",
    "iterative_rlhf",
    "load_preference_pairs",
    "load_sft_data",
    "masked_mean",
    "masked_whiten",
    "policy_loss",
    "response_forward",
    "sample_tokens",
    "save_policy",
    "sft_loss",
    "sft_train",
    "tokenize_pairs",
    "value_loss",
]
