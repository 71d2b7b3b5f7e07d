"""The one definition of the environment's options, shared by the single and the vector environment."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llm_env.kl import KL_ESTIMATORS, check_kl_coef, check_kl_estimator, warn_kl_gradient_bias
from llm_env.prompts import PromptOrder, PromptSource

__all__ = ["AdapterDisabled", "EnvConfig"]


@dataclass(frozen=True)
class AdapterDisabled:
    """Use a peft (LoRA) model with its adapters switched off as the reference model.

    With LoRA the frozen SFT model is exactly the base model under the adapter, so the environment runs
    the policy's own weights inside ``model.disable_adapter()`` instead of holding a second copy
    (Llama 2 and TRL's PPO did the same). Memory: one set of base weights for policy and reference.

    ``fuse=True`` (LoRA adapters only) also saves the policy's decode: the environment decodes 2B rows in
    one forward pass, B with the adapter (the policy) and B without (the reference), keeps the reference
    half for the KL reward and exposes the policy half's next-token logits to an agent acting with the
    same model (:class:`agents.TokenSampler`, :class:`agents.PPOAgent`), which then samples from them
    instead of running its own KV cache; see :class:`llm_env.fused.FusedDecoder`. The environment
    still computes the reference log-probabilities itself, and tokens, log-probabilities and rewards are
    those of the unfused environment up to float rounding. Other agents are unaffected (they decode
    themselves; the policy half is then computed for nothing).
    """

    model: nn.Module
    fuse: bool = False

    def __post_init__(self) -> None:
        if not callable(getattr(self.model, "disable_adapter", None)):
            raise TypeError("AdapterDisabled needs a peft model (with a disable_adapter() context manager)")
        if self.fuse and not isinstance(getattr(self.model, "active_adapter", None), str):
            raise ValueError("AdapterDisabled(fuse=True) needs a peft model with exactly one active adapter")


@dataclass(frozen=True)
class EnvConfig:
    """Options of :class:`llm_env.TextGenEnv` and :class:`llm_env.TextGenVectorEnv`.

    Both environments take these as keyword arguments (``gymnasium.make`` passes them through), or a
    whole ``EnvConfig`` as their first argument.
    """

    prompts: PromptSource
    """A JSONL path (one ``{"prompt": ...}`` per line) or any iterable of strings / mappings. A prompt may be
    a conversation, ``[{"role": "user", "content": ...}, ...]``, rendered with the chat template."""
    reward: Any
    """Reward source: a batched callable ``(prompts, responses) -> scores``, a sequence-classification
    model object, or a path / hub name of one (including a directory saved by ``rewards.RewardModel``)."""
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None
    """The policy's tokenizer, or its path; defaults to the reference model's path when that is a path."""
    reference: nn.Module | str | os.PathLike | AdapterDisabled | None = None
    """The frozen SFT reference: a causal LM object, a path / hub name, or ``AdapterDisabled(peft_model)``.
    ``None`` means no KL penalty (``kl_coef`` must then be 0)."""
    kl_coef: float | None = None
    """beta of the per-token penalty ``-beta * KL``; defaults to 0.05 (TRL's default) with a reference and
    0 without. Agents may change it between steps (adaptive KL control) through ``env.kl_coef``."""
    kl_estimator: str = field(default="k1", metadata={"choices": KL_ESTIMATORS})
    """Per-token KL estimator, a name in :data:`llm_env.kl.KL_ESTIMATORS`: with ``d = logp - ref_logp``,
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (Schulman, http://joschu.net/blog/kl-approx.html). Paid as a
    reward, only k1's policy gradient is the KL's; k2 and k3 warn (:func:`llm_env.kl.warn_kl_gradient_bias`)."""
    max_new_tokens: int = 64
    """Response length at which an episode is truncated."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens; defaults to the longest prompt of the source."""
    truncation_side: Literal["left", "right"] | None = None
    """What to do with a prompt longer than ``max_prompt_length``: keep its end (``"left"``), its start
    (``"right"``), or raise an error (``None``)."""
    action_vocab: Literal["model", "tokenizer"] = "model"
    """Which token ids are actions. ``"model"``: every row of the reference's output layer, so with a
    vocabulary padded beyond the tokenizer (common in released models) ids that decode to no text are
    valid actions: observed and KL-penalised, but absent from the response the reward model scores.
    ``"tokenizer"``: only the tokenizer's ``len(tokenizer)`` ids; larger ids are rejected as out of the
    vocabulary, so an agent sampling from the model's full logits must mask them. Without a reference
    both mean the tokenizer's ids."""
    stop_token_ids: Sequence[int] | None = None
    """Tokens that terminate an episode; defaults to the tokenizer's EOS token, and with chat prompts also
    the chat template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``: see
    :func:`llm_env.chat.end_of_turn_ids`)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the final reward of a response truncated before any stop token (as TRL's PPO)."""
    prompt_order: PromptOrder = "shuffle"
    """``"shuffle"``: each sub-env walks a seeded permutation per epoch; ``"sequential"``: sub-env i takes
    prompts i, i + B, i + 2B, ... (each prompt once per pass, for evaluation)."""
    prompt_key: str = "prompt"
    """Field holding the prompt in JSONL objects and mappings."""
    chat_template: bool = False
    """Wrap each text prompt as a user message and render it with the tokenizer's chat template (prompts
    given as conversations, lists of ``{"role", "content"}`` messages, are always rendered so)."""
    reward_tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None
    """Tokenizer of a reward-model object (a reward path loads its own)."""
    reward_batch_size: int = 32
    """Responses per reward-model forward pass."""
    device: torch.device | str = "auto"
    """Where the token state, the reference model and the returned tensors live: ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, or ``"auto"`` (the reference model object's device when one is given, else CUDA when
    available, else the CPU: :func:`llm_env.models.resolve_device`)."""
    dtype: torch.dtype | str | None = None
    """dtype for models loaded from a path (``"bfloat16"`` on GPUs); ``None`` keeps the checkpoint's."""
    trust_remote_code: bool = False
    """Allow custom modelling code from model repositories. Off unless you trust the repository."""
    responder: Callable[..., Any] | None = None
    """Multi-turn episodes: called when the agent ends a turn (emits a stop token) with the
    :class:`llm_env.multiturn.Conversation` so far; returns a :class:`llm_env.multiturn.Reply` (or its text,
    or ``None`` to end the episode). The reply's tokens join the context (``max_new_tokens`` then bounds
    everything after the prompt: the agent's tokens and the replies) and observations gain ``agent_mask``.
    See :mod:`llm_env.multiturn`. ``None``: one prompt, one response."""
    max_turns: int | None = None
    """With a responder, the most turns of the agent in an episode: the episode is truncated after the
    responder has answered (and paid for) the last one. ``None``: only ``max_new_tokens`` limits it."""
    cuda_graphs: bool = False
    """Replay the reference's decode step (and a fused policy's) as a CUDA graph: one launch per step
    instead of hundreds, for small models whose eager decode is bound by kernel launches. CUDA only;
    falls back to eager decoding with a warning if the model cannot be captured (see
    :class:`llm_env.IncrementalLM`)."""

    def __post_init__(self) -> None:
        if self.kl_coef is None:
            object.__setattr__(self, "kl_coef", 0.05 if self.reference is not None else 0.0)
        check_kl_coef(self.kl_coef, has_reference=self.reference is not None)
        check_kl_estimator(self.kl_estimator)
        if self.kl_coef > 0:  # the environment pays the KL as a reward: only k1's gradient is the KL's
            warn_kl_gradient_bias(self.kl_estimator, "reward")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_prompt_length is not None and (
            not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length must be a positive integer, got {self.max_prompt_length!r}")
        if self.truncation_side not in (None, "left", "right"):
            raise ValueError(f"truncation_side must be 'left', 'right' or None, got {self.truncation_side!r}")
        if self.action_vocab not in ("model", "tokenizer"):
            raise ValueError(f"action_vocab must be 'model' or 'tokenizer', got {self.action_vocab!r}")
        if self.prompt_order not in ("shuffle", "sequential"):
            raise ValueError(f"prompt_order must be 'shuffle' or 'sequential', got {self.prompt_order!r}")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty must be finite, got {self.missing_eos_penalty!r}")
        if not isinstance(self.reward_batch_size, int) or self.reward_batch_size < 1:
            raise ValueError(f"reward_batch_size must be a positive integer, got {self.reward_batch_size!r}")
        if self.responder is not None and not callable(self.responder):
            raise TypeError(
                f"responder must be callable (conversation -> reply), got {type(self.responder).__name__}"
            )
        if self.max_turns is not None:
            if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
                raise ValueError(f"max_turns must be a positive integer or None, got {self.max_turns!r}")
            if self.responder is None:
                raise ValueError("max_turns needs a responder (without one every episode has a single turn)")
        if self.tokenizer is None and not isinstance(self.reference, (str, os.PathLike)):
            raise ValueError("pass tokenizer=... (it can only be inferred when reference is a path)")
