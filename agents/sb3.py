"""Stable-Baselines3 support: an actor-critic policy whose trunk is a transformers causal LM.

``stable_baselines3.PPO(LMActorCriticPolicy, env, policy_kwargs={"model": path_or_model})`` trains the LM
on :class:`~llm_env.TextGenEnv` with SB3's own, unmodified PPO and VecEnv. The pieces slot into SB3's
extension points and nothing of SB3 is overridden:

* :class:`LMFeaturesExtractor` runs the LM's trunk over the observation (token ids and attention mask)
  and returns the final hidden state at the last real token, the state s_t;
* the action network is the LM's own output head, so the initial policy is exactly the LM's next-token
  distribution; the value network is a fresh linear head on the same state (shared trunk);
* no MLP in between (``net_arch=[]``) and no orthogonal re-initialisation of the pretrained weights.

SB3 does not report log-probabilities to the environment, so each token is rewarded with
``kl_coef * log pi_ref(a_t|s_t)`` (see :mod:`llm_env.core`). Give SB3 ``ent_coef=kl_coef`` and the
entropy bonus supplies the other half of the KL penalty: the objective is then the usual KL-regularised
RLHF objective in expectation. Use ``gamma=1.0`` since the reward model judges whole responses. SB3
re-encodes the whole observation at every step (it has no KV cache), which is fine for small models.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from agents.policy import add_lora, hidden_size
from llm_env.models import load_causal_lm, unwrap_model

__all__ = ["LMActorCriticPolicy", "LMFeaturesExtractor"]


class LMFeaturesExtractor(BaseFeaturesExtractor):
    """Final hidden state of a causal LM at the last attended position of each observation.

    Args:
        observation_space: the environment's ``Dict(input_ids, attention_mask)`` space.
        model: the causal LM (object, path or hub name).
        lora_rank: wrap the LM with LoRA adapters of this rank and train only those (0: full).
    """

    def __init__(
        self, observation_space: gym.spaces.Dict, model: nn.Module | str | os.PathLike, lora_rank: int = 0
    ):
        if not isinstance(observation_space, gym.spaces.Dict) or set(observation_space.spaces) not in (
            {"input_ids", "attention_mask"},
            {"input_ids", "attention_mask", "agent_mask"},  # multi-turn: the whole context is read anyway
        ):
            raise ValueError(
                "LMFeaturesExtractor needs the TextGenEnv observation space Dict(input_ids, attention_mask"
                "[, agent_mask])"
            )
        lm = load_causal_lm(model)
        super().__init__(observation_space, features_dim=hidden_size(lm))
        if lora_rank:
            for p in lm.parameters():
                p.requires_grad_(False)
            lm = add_lora(lm, rank=lora_rank)
        self.lm = lm

    @property
    def output_head(self) -> nn.Module:
        """The LM head (maps a hidden state to next-token logits)."""
        return unwrap_model(self.lm).get_output_embeddings()

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trunk's last hidden state at each observation's last real token (position
        ``attention_mask.sum() - 1``), shape ``(B, d)``: SB3's features, from which the LM head gives the
        next-token logits."""
        # SB3 hands observations over as float tensors; token ids below 2**24 are exact in float32.
        input_ids = observations["input_ids"].long()
        attention_mask = observations["attention_mask"].long()
        trunk = unwrap_model(self.lm).base_model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, d)
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic policy over a transformers causal LM (see the module docstring).

    Extra ``policy_kwargs``: ``model`` (object, path or hub name) and ``lora_rank``.
    """

    def __init__(
        self,
        observation_space: gym.spaces.Space,
        action_space: gym.spaces.Space,
        lr_schedule: Any,
        model: nn.Module | str | os.PathLike,
        lora_rank: int = 0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, gym.spaces.Discrete):
            raise ValueError(f"LMActorCriticPolicy needs a Discrete action space, got {action_space}")
        kwargs.setdefault("optimizer_class", torch.optim.AdamW)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],
            ortho_init=False,
            features_extractor_class=LMFeaturesExtractor,
            features_extractor_kwargs={"model": model, "lora_rank": lora_rank},
            share_features_extractor=True,
            **kwargs,
        )

    def _build(self, lr_schedule: Any) -> None:
        self._build_mlp_extractor()  # net_arch=[]: the identity
        head = self.features_extractor.output_head
        if head.weight.shape[0] != self.action_space.n:
            raise ValueError(
                f"the LM head has {head.weight.shape[0]} outputs but the action space has {self.action_space.n}"
            )
        self.action_net = head
        self.value_net = nn.Linear(self.features_dim, 1)
        nn.init.zeros_(self.value_net.weight)
        nn.init.zeros_(self.value_net.bias)
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = self.optimizer_class(params, lr=lr_schedule(1), **self.optimizer_kwargs)
