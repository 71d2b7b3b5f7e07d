"""agents: token-level PPO, rejection sampling and SFT that act through :class:`llm_env.TextGenVectorEnv`.

* :class:`Agent` / :func:`collect_episodes`: the protocol any agent implements and the loop that runs it.
* :class:`PPOAgent` (+ :class:`PPOConfig`): PPO with GAE, clipped policy/value losses, adaptive KL, PPO-ptx,
  LoRA with the adapter-disabled base as reference, checkpoint and resume.
* :class:`RejectionSamplingAgent`: Llama 2's best-of-k sampling and fine-tuning, with the best-of-k KL.
* :func:`sft_train`: supervised fine-tuning with the loss on response tokens only.
* :class:`DPOAgent` (+ :class:`DPOConfig`, :func:`dpo_loss`): offline DPO (Rafailov et al. 2023) and IPO
  (Azar et al. 2023) on preference pairs, against the frozen (or adapter-disabled LoRA) reference.
* :class:`OnlineDPOAgent` (+ :class:`OnlineDPOConfig`): online DPO (Guo et al. 2024), two samples per prompt
  through the environment, ranked by the reward model.
* :func:`iterative_rlhf`: rejection-sampling rounds V1..Vn, then PPO (Llama 2).
* :class:`LMActorCriticPolicy`: lets unmodified Stable-Baselines3 PPO train a transformers LM on TextGenEnv.
"""

from agents.dpo import DPOAgent, DPOConfig, dpo_loss, load_preference_pairs
from agents.kl_controllers import AdaptiveKLController, FixedKLController
from agents.losses import explained_variance, gae, masked_mean, masked_whiten, policy_loss, value_loss
from agents.online_dpo import OnlineDPOAgent, OnlineDPOConfig
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
from agents.rejection import (
    RejectionSamplingAgent,
    RejectionSamplingConfig,
    best_of_k_kl,
    best_of_k_kl_theory,
)
from agents.rollout import Agent, LearningAgent, Trajectories, collect_episodes
from agents.sb3 import LMActorCriticPolicy, LMFeaturesExtractor
from agents.sft import SFTConfig, load_sft_data, sft_loss, sft_train, tokenize_pairs

__all__ = [
    "AdaptiveKLController",
    "Agent",
    "DPOAgent",
    "DPOConfig",
    "FixedKLController",
    "IterativeConfig",
    "IterativeResult",
    "LMActorCriticPolicy",
    "LMFeaturesExtractor",
    "LearningAgent",
    "OnlineDPOAgent",
    "OnlineDPOConfig",
    "PPOAgent",
    "PPOConfig",
    "RejectionSamplingAgent",
    "RejectionSamplingConfig",
    "SFTConfig",
    "SequenceBatch",
    "TokenSampler",
    "Trajectories",
    "ValueHead",
    "add_lora",
    "best_of_k_kl",
    "best_of_k_kl_theory",
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
