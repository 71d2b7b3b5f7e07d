"""Language-model building blocks shared by the agents.

* :class:`TokenSampler` acts in a :class:`~llm_env.TextGenVectorEnv` with any causal LM: it keeps the
  policy's own slot KV cache (:class:`~llm_env.IncrementalLM`), prefills the sub-environments that
  restarted, decodes one token for the others, samples on the device and reports the log-probabilities
  the environment needs.
* :class:`SequenceBatch` and :func:`response_forward` score whole (prompt, response) sequences in one
  teacher-forced forward pass: log-probabilities, values and entropies of every response token, which is
  what PPO's update, SFT and KL measurements need.
* :class:`ValueHead` and :func:`add_lora` build the trainable parts.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from llm_env import IncrementalLM, TextGenVectorEnv, TokenActions
from llm_env.decoding import host_to_device, left_pad
from llm_env.distributed import barrier, full_state_dict, is_main_process, is_sharded
from llm_env.models import load_causal_lm, load_tokenizer, model_device, resolve_device, unwrap_model
from llm_env.reward import SequenceClassifierReward

__all__ = [
    "Critic",
    "SequenceBatch",
    "TokenSampler",
    "ValueHead",
    "add_lora",
    "hidden_size",
    "load_policy",
    "response_forward",
    "sample_tokens",
    "save_policy",
]


def hidden_size(model: nn.Module) -> int:
    """Width of the model's final hidden state."""
    config = unwrap_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(config.hidden_size)


class ValueHead(nn.Module):
    """Scalar value V(s_t) read from the policy's final hidden state (shared trunk).

    Sharing the trunk keeps one model in memory for policy and value (the choice of the PPO
    implementations of Ziegler et al. 2019 and TRL's ``AutoModelForCausalLMWithValueHead``); the value
    loss reaches the trunk scaled by ``vf_coef``. The head starts at zero so the first advantages are
    the raw returns.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (..., d) -> (...)
        """Values of hidden states ``(..., d)``, shape ``(...)``, computed in the head's dtype."""
        return self.linear(hidden_states.to(self.linear.weight.dtype)).squeeze(-1)


class Critic(nn.Module):
    """A value network of its own: a transformer backbone and a scalar head, initialised from a reward model.

    InstructGPT (Ouyang et al. 2022, appendix C.3) "initialize[s] the value function from the RM": a reward
    model read at the end of every prefix already estimates how good the finished response will be, so the
    critic starts with useful values instead of zeros. A value head on the policy's trunk cannot start
    there, and on small rollouts it barely learns (it fits each update's 64 episodes and predicts the next
    ones no better than a constant). The head is rescaled with the reward model's score statistics when it
    has them, so that the initial values are on the scale of the whitened reward the environment pays.
    """

    def __init__(self, backbone: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def from_reward_model(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device | str | None = None,
        whiten: bool = True,
    ) -> Critic:
        """The backbone and ``score`` head of a one-label sequence-classification checkpoint (a reward model
        saved by ``rewards.RewardModel.save_pretrained`` or any ``...ForSequenceClassification`` with a
        ``score`` head: GPT-2, Llama, Mistral, Qwen). ``tokenizer`` is the policy's: the critic reads the
        policy's token ids, so the checkpoint's own tokenizer must have the same vocabulary."""
        rm = SequenceClassifierReward.from_pretrained(path, device=device)
        if rm.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"the critic's reward model {os.fspath(path)} has a different vocabulary from the policy's "
                f"tokenizer ({len(rm.tokenizer)} vs {len(tokenizer)} tokens): the critic reads the policy's "
                "token ids, so it must come from a model trained with the same tokenizer"
            )
        model = unwrap_model(rm.model)
        score, backbone = getattr(model, "score", None), getattr(model, "base_model", None)
        if (
            not isinstance(score, nn.Linear)
            or score.out_features != 1
            or backbone is None
            or backbone is model
        ):
            raise ValueError(
                f"{os.fspath(path)} is not a decoder sequence-classification model with a one-output `score` "
                f"head (got {type(model).__name__}); a critic needs the backbone's per-position hidden states"
            )
        head = ValueHead(score.in_features).to(score.weight.device)
        with torch.no_grad():
            weight = score.weight.detach().float().clone()
            bias = score.bias.detach().float().clone() if score.bias is not None else torch.zeros(1)
            if whiten and rm.stats is not None:  # V = (score - mean) / std, folded into the head
                weight /= rm.stats.std
                bias = (bias - rm.stats.mean) / rm.stats.std
            head.linear.weight.copy_(weight)
            head.linear.bias.copy_(bias.to(weight.device))
        return cls(backbone, head)

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        """V(s_t) for every response token of ``batch``: the head on the backbone's hidden state at the
        position that predicts token t (the prompt and the response before it), 0 on padding."""
        hidden = self.backbone(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        hidden = hidden.gather(1, batch.positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(hidden).float().masked_fill(~batch.response_mask, 0.0)


def add_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = "all-linear",
) -> nn.Module:
    """Wrap a causal LM with peft LoRA adapters (Hu et al. 2021); only the adapters are trainable.

    GPT-2's ``Conv1D`` layers store their weight transposed, which peft handles with ``fan_in_fan_out``;
    it is set automatically here.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        fan_in_fan_out=conv1d,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def sample_tokens(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from the categorical distribution ``exp(logprobs)``, (B, V) -> (B,).

    Inverse-CDF sampling: the running sum of the probabilities and one binary search per row for a
    uniform draw in ``(0, total]``. It samples exactly the distribution ``torch.multinomial`` samples (each
    token's interval ``(cdf[i-1], cdf[i]]`` has width ``p_i`` up to one float rounding, ~6e-8; a token of
    probability 0 has an empty interval and is never drawn, because the draw is never 0), but costs ~0.7 ms
    instead of ~12 ms for (16, 50257) on 2 CPU cores, where ``multinomial`` was the most expensive op of an
    agent's step after the forward pass. It draws B numbers from ``generator`` and never syncs with a GPU.
    """
    cdf = logprobs.exp().cumsum_(dim=-1)  # (B, V), non-decreasing
    uniform = 1.0 - torch.rand(  # (0, 1]: never 0, so the first nonzero-probability token is the floor
        (cdf.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype
    )
    return torch.searchsorted(cdf, uniform * cdf[:, -1:]).squeeze(1).clamp_(max=cdf.shape[1] - 1)


class TokenSampler:
    """Samples the next token of every sub-environment from a causal LM, with the policy's own KV cache.

    The acting half of PPO and rejection sampling, and on its own the way to run any policy (an SFT model, a
    trained one) in a :class:`~llm_env.TextGenVectorEnv`: it prefills the sub-environments that restarted,
    decodes one token for the others, samples on the device and reports the log-probabilities the
    environment needs for the KL penalty. Its slot KV cache (:class:`~llm_env.IncrementalLM`) is built on
    the first observation and rebuilt when the observation shape (number of sub-environments, length) or
    the model changes.

    Args:
        model: the policy (a transformers causal LM or a peft model).
        temperature: sampling temperature; log-probabilities are those of the tempered distribution, i.e.
            of the behaviour policy actually used.
        generator: the torch random generator for sampling, on the model's device (default: a new one
            seeded with ``seed``).
        seed: seed of the default generator.
        greedy: take the argmax instead of sampling.
        cuda_graph: replay the decode step as a CUDA graph (see :class:`~llm_env.IncrementalLM`).
        env: an environment to read fused policy logits from (see :meth:`attach`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int = 0,
        greedy: bool = False,
        cuda_graph: bool = False,
        env: TextGenVectorEnv | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = temperature
        self.greedy = greedy
        self.cuda_graph = cuda_graph
        self.generator = generator or torch.Generator(device=model_device(model)).manual_seed(seed)
        self.env = env
        self.device = model_device(model)
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        self.lm: IncrementalLM | None = None
        self._key: tuple[Any, ...] | None = None  # (B, L, model) the cache was built for
        self._cache_valid = True  # False after acting from fused logits: our own cache was not advanced
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of the current states
        self._last: torch.Tensor | None = None  # (B,) tokens chosen at the previous call

    def attach(self, env: TextGenVectorEnv | None) -> None:
        """Act from ``env``'s fused policy logits when it has them (:meth:`~llm_env.TextGenVectorEnv.policy_logits`).

        With ``reference=AdapterDisabled(model, fuse=True)`` the environment decodes this sampler's model
        together with the reference in one forward pass per step; attached, the sampler samples from that
        policy half instead of decoding again (same tokens and log-probabilities up to float rounding).
        ``None`` detaches. Environments that do not fuse this model are harmless: the sampler decodes.
        """
        self.env = env

    def _ensure_cache(self, obs: dict[str, torch.Tensor]) -> None:
        batch, length = obs["input_ids"].shape
        key = (batch, length, id(self.model))
        if self.lm is None or self._key != key:
            self.lm = IncrementalLM(self.model, batch, length, cuda_graph=self.cuda_graph)
            self.device = self.lm.device
            self._key, self._logits, self._last, self._cache_valid = key, None, None, True

    @torch.no_grad()
    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions:
        """Tokens and their log-probabilities (under the tempered policy) for the observations ``obs``.

        ``restarted[i]`` marks sub-environments that hold a fresh prompt (after a reset); the others have
        appended the token this sampler returned last time, or, if their observation did not grow (the
        environment did not step them), are left as they are. The tokens sampled for rows that do not
        step are meaningless (the environment ignores them).
        """
        restarted = np.asarray(restarted, dtype=bool)
        self._ensure_cache(obs)
        fused = self.env.policy_logits(obs, self.model) if self.env is not None else None
        if fused is not None and fused.shape[0] == len(restarted):
            self._logits = fused
            self._cache_valid = False
            return self._sample()
        if not self._cache_valid:  # our cache missed the tokens appended while we read fused logits
            restarted = np.ones_like(restarted)
            self._logits = None  # it was the environment's tensor: never write into it
            self._cache_valid = True
        if self._last is not None and not restarted.all():
            # The rows whose observation grew by the token chosen last time take it; restarted rows are
            # prefilled below, and rows the environment did not step (an episode that just ended, a frozen
            # row with autoreset disabled, a row waiting for its first reset) keep their cache in place.
            lengths = obs["attention_mask"].to(self.device).sum(dim=1)
            fresh = host_to_device(restarted, self.device)
            grown = lengths == self.lm.length + 1
            self._logits = self.lm.decode(self._last, advance=grown & ~fresh).logits
            if "agent_mask" in obs:  # multi-turn: a reply may have joined the context after our token
                self._extend_answered(obs, lengths, (lengths > self.lm.length + 1) & ~fresh)
        if restarted.any():
            rows = np.flatnonzero(restarted)
            ids = obs["input_ids"][rows].to(self.device)
            lengths = obs["attention_mask"][rows].sum(dim=1).cpu().numpy()  # read only when prompts change
            prompts = [row[:n] for row, n in zip(ids.cpu().numpy(), lengths)]
            padded, lengths = left_pad(prompts, pad_id=0, device=self.device)
            logits = self.lm.prefill(rows, padded, lengths).logits
            if self._logits is None:
                self._logits = logits.new_zeros(len(restarted), logits.shape[-1])
            self._logits[host_to_device(rows, self.device)] = logits
        return self._sample()

    def _extend_answered(
        self, obs: dict[str, torch.Tensor], lengths: torch.Tensor, answered: torch.Tensor
    ) -> None:
        """Prefill, in one chunk per row, the token chosen last time and the reply that followed it in the
        rows ``answered``. Costs one host read of B flags per step, in multi-turn environments only."""
        rows = np.flatnonzero(answered.cpu().numpy())
        if rows.size == 0:
            return
        rows_t = host_to_device(rows, self.device)
        starts = self.lm.length[rows_t].cpu().numpy()
        ends = lengths[rows_t].cpu().numpy()
        ids = obs["input_ids"][rows_t.to(obs["input_ids"].device)].cpu().numpy()
        chunks = [row[start:end] for row, start, end in zip(ids, starts, ends)]
        padded, chunk_lengths = left_pad(chunks, pad_id=0, device=self.device)
        self._logits[rows_t] = self.lm.extend(rows, padded, chunk_lengths).logits

    def _sample(self) -> TokenActions:
        logits = self._logits if self.temperature == 1.0 else self._logits / self.temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        if self.greedy:
            tokens = logprobs.argmax(dim=-1)
        else:
            tokens = sample_tokens(logprobs, self.generator)
        self._last = tokens
        return TokenActions(tokens, logprobs.gather(1, tokens[:, None]).squeeze(1))


def load_policy(
    policy: nn.Module | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None,
    device: torch.device | str | None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, torch.device]:
    """The policy model, its tokenizer and the device the agents train on.

    The tokenizer defaults to the policy's path; the device to the model object's (or CUDA when available
    for a path).
    """
    if tokenizer is None:
        if not isinstance(policy, (str, os.PathLike)):
            raise ValueError("pass tokenizer=... (it can only be inferred when policy is a path)")
        tokenizer = policy
    if device is None and isinstance(policy, nn.Module):
        device = model_device(policy)
    device = resolve_device(device)
    model = load_causal_lm(policy, device=device)
    if model_device(model) != device:
        model = model.to(device)
    return model, load_tokenizer(tokenizer), device


def save_policy(model: nn.Module, tokenizer: Any, path: Any) -> None:
    """Save a policy as a plain transformers checkpoint (LoRA adapters merged into a copy) with its tokenizer.

    On N processes every rank calls it and rank 0 writes; an FSDP-sharded policy is gathered first (a
    collective) into a plain copy on rank 0's CPU. Every rank returns only once the files are in place, so
    that any rank may load the saved policy next (the others used to return at once and raced rank 0's
    write). As in :mod:`agents.checkpoint`, a rank 0 that fails while writing exits with its error and
    torchrun stops the ranks waiting here (the wait also times out with every collective, see
    :mod:`llm_env.distributed`), so none waits forever.
    """
    state = full_state_dict(model) if is_sharded(model) else None  # a collective: rank 0 gets the weights
    if is_main_process():
        if state is not None:
            model = _unsharded_copy(model, state)
        if hasattr(model, "merge_and_unload"):
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    barrier()  # nobody moves on (or loads the policy) before it is written


def _unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain CPU model of ``model``'s architecture (and LoRA configuration) holding the weights ``state``."""
    from transformers import AutoModelForCausalLM

    base = unwrap_model(model)
    plain = AutoModelForCausalLM.from_config(base.config)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        plain = get_peft_model(plain, copy.deepcopy(model.peft_config[model.active_adapter]))
    plain.load_state_dict(state, strict=False)
    return plain.to(next(p for p in base.parameters() if p.is_floating_point()).dtype)


@dataclass
class SequenceBatch:
    """Right-padded (prompt + response) sequences and where their response tokens sit.

    ``positions[n, j]`` is the index of the logit that predicts response token ``j`` of sequence ``n``
    (the position of the token before it), so one forward pass scores every response token.

    In a multi-turn episode the "response" is the whole conversation after the prompt, but only the agent's
    tokens are scored: ``response_ids`` then holds the agent's tokens alone (aligned with its steps, the
    per-token rewards and log-probabilities of :class:`~agents.Trajectories`) and ``positions`` points at
    their logits inside the full context, replies included (``build(..., agent_masks=...)``).
    """

    input_ids: torch.Tensor  # (N, S)
    attention_mask: torch.Tensor  # (N, S)
    positions: torch.Tensor  # (N, T)
    response_ids: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, T) bool

    @classmethod
    def build(
        cls,
        prompts: Sequence[Any],
        responses: Sequence[Any],
        *,
        pad_id: int,
        device: torch.device | str,
        agent_masks: Sequence[Any] | None = None,
    ) -> SequenceBatch:
        """From per-example prompt ids and response ids (lists, arrays or 1-D tensors).

        ``agent_masks`` (multi-turn episodes): per example a boolean mask over its response, True on the
        agent's tokens; the others (replies) are context only. ``None`` entries, or no masks, mean every
        response token is the agent's."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(
                f"need as many prompts as responses (>0), got {len(prompts)} and {len(responses)}"
            )
        if agent_masks is not None and len(agent_masks) != len(responses):
            raise ValueError(f"need one agent mask per response, got {len(agent_masks)} for {len(responses)}")
        prompts = [torch.as_tensor(np.asarray(p), dtype=torch.long).flatten() for p in prompts]
        responses = [torch.as_tensor(np.asarray(r), dtype=torch.long).flatten() for r in responses]
        agent = []  # per example, the indices of the agent's tokens in its response
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if p.numel() == 0 or r.numel() == 0:
                raise ValueError(f"example {i} has an empty {'prompt' if p.numel() == 0 else 'response'}")
            m = None if agent_masks is None else agent_masks[i]
            if m is None:
                agent.append(torch.arange(r.numel()))
                continue
            m = torch.as_tensor(np.asarray(m)).flatten().bool()
            if m.numel() != r.numel() or not m.any():
                raise ValueError(
                    f"example {i}: its agent mask must have one entry per response token ({r.numel()}) and "
                    f"mark at least one, got {m.numel()} entries, {int(m.sum())} marked"
                )
            agent.append(torch.nonzero(m).flatten())
        n = len(prompts)
        width = max(p.numel() + r.numel() for p, r in zip(prompts, responses))
        steps = max(a.numel() for a in agent)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, steps), dtype=torch.long)
        response_ids = torch.full((n, steps), pad_id, dtype=torch.long)
        response_mask = torch.zeros((n, steps), dtype=torch.bool)
        for i, (p, r, a) in enumerate(zip(prompts, responses, agent)):
            total = p.numel() + r.numel()
            input_ids[i, :total] = torch.cat([p, r])
            attention_mask[i, :total] = 1
            positions[i, : a.numel()] = p.numel() - 1 + a
            response_ids[i, : a.numel()] = r[a]
            response_mask[i, : a.numel()] = True
        return cls(
            *(t.to(device) for t in (input_ids, attention_mask, positions, response_ids, response_mask))
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> SequenceBatch:
        """A sub-batch (rows ``index``), trimmed to its own longest sequence."""
        if not isinstance(
            index, torch.Tensor
        ):  # np.asarray would fail on a CUDA tensor (the trainers' indices)
            index = np.asarray(index)
        index = torch.as_tensor(index, dtype=torch.long, device=self.input_ids.device)
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        steps = int(self.response_mask[index].sum(dim=1).max())
        return SequenceBatch(
            self.input_ids[index, :width],
            mask[:, :width],
            self.positions[index, :steps],
            self.response_ids[index, :steps],
            self.response_mask[index, :steps],
        )


@dataclass
class ResponseScores:
    """Per-response-token outputs of :func:`response_forward`, each (N, T); padding positions are 0."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def response_forward(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    value_head: ValueHead | None = None,
    entropy: bool = False,
) -> ResponseScores:
    """One teacher-forced forward pass: log pi(y_j | x, y_<j) for every response token.

    Logits are divided by ``temperature`` so that the probabilities are those of the behaviour policy
    that sampled the tokens (TRL does the same). Works with and without autograd.
    """
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=value_head is not None,
    )
    index = batch.positions[..., None]  # (N, T, 1)
    logits = (
        out.logits.float().gather(1, index.expand(-1, -1, out.logits.shape[-1])) / temperature
    )  # (N, T, V)
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(2, batch.response_ids[..., None]).squeeze(2)
    mask = batch.response_mask
    result = ResponseScores(logprobs=logprobs.masked_fill(~mask, 0.0))
    if value_head is not None:
        hidden = out.hidden_states[-1]
        hidden = hidden.gather(1, index.expand(-1, -1, hidden.shape[-1]))  # (N, T, d): the state s_t
        result.values = value_head(hidden).float().masked_fill(~mask, 0.0)
    if entropy:
        result.entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mask, 0.0)
    return result
