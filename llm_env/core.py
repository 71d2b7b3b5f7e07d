"""The token logic shared by :class:`~llm_env.TextGenEnv` and :class:`~llm_env.TextGenVectorEnv`.

:class:`EpisodeBatch` holds B episodes as tensors on the device (plus a host mirror of the tokens, so
that texts and observations of the single environment never need a device read): it restarts rows with
new prompts, appends one token per row per step, advances the reference model with its KV cache,
computes the per-token KL reward, detects the episode ends and scores the finished responses in one
batched reward call. The single environment is this class with B = 1; the vector environment adds
Gymnasium's autoreset on top. Nothing here is duplicated between the two.

Per-token reward (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022), with
``d_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)`` and the chosen estimator ``k(d)``::

    r_t = -beta * k(d_t)                                  on every generated token
        + RM(prompt, response) [- missing_eos_penalty]    added on the last token of the response

When the agent does not report ``log pi(a_t|s_t)``, the environment returns ``r_t = beta * log
pi_ref(a_t|s_t)`` instead. Because ``-beta * KL(pi || pi_ref) = beta * E[log pi_ref] + beta * H(pi)``,
this is the same objective with the entropy half left to the agent: an agent with an entropy bonus of
coefficient beta (Stable-Baselines3's ``ent_coef``) optimises exactly the KL-regularised return.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llm_env.chat import ChatPrompt, end_of_turn_ids
from llm_env.config import AdapterDisabled, EnvConfig
from llm_env.decoding import IncrementalLM, host_to_device, left_pad
from llm_env.fused import FusedDecoder
from llm_env.kl import kl_penalty
from llm_env.models import (
    load_causal_lm,
    load_tokenizer,
    model_context_length,
    model_device,
    model_vocab_size,
    pad_token_id,
    resolve_device,
)
from llm_env.multiturn import AGENT, Conversation, Reply, ReplyRenderer, Transcript, Turn, as_reply
from llm_env.prompts import load_prompts, tokenize_prompts
from llm_env.reward import as_reward_function, check_scores

__all__ = ["EpisodeBatch", "StepResult", "TokenActions"]


class TokenActions(NamedTuple):
    """An action together with the acting policy's log-probability of it.

    ``env.step(TokenActions(tokens, logprobs))`` is how an agent reports ``log pi(a_t|s_t)`` so the
    environment can compute the exact per-token KL penalty. For the single environment ``tokens`` is
    an int and ``logprobs`` a float; for the vector environment both have shape ``(num_envs,)``.
    A plain action (no log-probability) is also accepted: see the module docstring for the reward then.
    """

    tokens: Any
    logprobs: Any


@dataclass
class StepResult:
    """What :meth:`EpisodeBatch.step` returns."""

    reward: torch.Tensor  # (B,) float32 on the device
    terminated: np.ndarray  # (B,) bool: a stop token ended the episode (no reply followed)
    truncated: np.ndarray  # (B,) bool: the token budget (or a turn limit, a reply that did not fit) ended it
    finished: np.ndarray  # (n,) rows whose episode ended at this step
    completions: dict[str, np.ndarray]  # per finished row (n,): see EpisodeBatch.COMPLETION_FIELDS
    replies: dict[int, tuple[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    """Multi-turn: row -> (reply text, its token ids) for the rows whose context a reply joined."""


def _check_context(
    reference: torch.nn.Module, prompt_length: int, new_tokens: int, configured: int | None
) -> None:
    """Reject a budget that does not fit the reference's context now rather than mid-episode."""
    context = model_context_length(reference)
    if context is None or prompt_length + new_tokens <= context[0]:
        return
    limit, field = context
    fixes = []
    if limit - prompt_length >= 1:
        fixes.append(f"max_new_tokens to <= {limit - prompt_length}")
    if limit - new_tokens >= 1:
        fixes.append(
            f"max_prompt_length to <= {limit - new_tokens} (longer prompts then need truncation_side)"
        )
    inferred = "" if configured is not None else "; max_prompt_length defaults to the longest prompt"
    raise ValueError(
        f"max_prompt_length + max_new_tokens = {prompt_length} + {new_tokens} = {prompt_length + new_tokens} "
        f"tokens exceed the reference model's context of {limit} positions (config.{field}{inferred}): "
        f"lower {' or '.join(fixes)}"
    )


class EpisodeBatch:
    """B episodes of prompt + response, stepped in lockstep (see the module docstring)."""

    COMPLETION_FIELDS = ("prompt", "response", "score", "kl", "return", "length", "eos", "prompt_index")

    def __init__(self, config: EnvConfig, num_envs: int) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.config = config
        self.num_envs = num_envs
        reference_object = (
            config.reference.model if isinstance(config.reference, AdapterDisabled) else config.reference
        )
        self.device = resolve_device(config.device, reference_object)
        self.kl_coef = float(config.kl_coef)

        reference = config.reference
        tokenizer_source = config.tokenizer if config.tokenizer is not None else reference
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(
            tokenizer_source, trust_remote_code=config.trust_remote_code
        )
        self.pad_id = pad_token_id(self.tokenizer)

        context = None
        fuse = False
        if isinstance(reference, AdapterDisabled):
            context = reference.model.disable_adapter
            fuse = reference.fuse
            reference = reference.model
        if reference is not None:
            reference = load_causal_lm(
                reference, device=self.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code
            )
            if model_device(reference) != self.device:
                if context is not None:
                    raise ValueError(
                        f"the adapter-disabled reference lives on {model_device(reference)} but the env device is "
                        f"{self.device}; move the policy or pass device={model_device(reference)}"
                    )
                reference = reference.to(self.device)
            if context is None:
                reference.eval().requires_grad_(False)
            self.model_vocab_size = model_vocab_size(reference)
            if len(self.tokenizer) > self.model_vocab_size:
                raise ValueError(
                    f"the tokenizer has {len(self.tokenizer)} tokens but the reference model's vocabulary has "
                    f"{self.model_vocab_size}: the tokenizer and the model do not belong together"
                )
        else:
            self.model_vocab_size = len(self.tokenizer)
        # The actions: every id of the model's output layer, or only the tokenizer's (config.action_vocab).
        self.vocab_size = len(self.tokenizer) if config.action_vocab == "tokenizer" else self.model_vocab_size
        self.reference = reference

        # Texts: what the reward source and the completion infos see (a ChatPrompt for a rendered conversation).
        self.prompts, self._prompt_ids = tokenize_prompts(
            load_prompts(config.prompts, key=config.prompt_key),
            self.tokenizer,
            max_length=config.max_prompt_length,
            truncation_side=config.truncation_side,
            chat_template=config.chat_template,
            vocab_size=self.vocab_size,
        )
        self.max_prompt_length = config.max_prompt_length or max(len(ids) for ids in self._prompt_ids)
        self.max_new_tokens = config.max_new_tokens
        self.max_length = self.max_prompt_length + self.max_new_tokens
        if reference is not None:
            _check_context(reference, self.max_prompt_length, self.max_new_tokens, config.max_prompt_length)

        stop = config.stop_token_ids
        if stop is None:
            stop = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
            if any(isinstance(p, ChatPrompt) for p in self.prompts):  # instruct models end their turn first
                stop += [t for t in end_of_turn_ids(self.tokenizer) if t not in stop]
        stop = [int(t) for t in stop]
        if any(not 0 <= t < self.vocab_size for t in stop):
            raise ValueError(f"stop_token_ids {stop} are outside the vocabulary [0, {self.vocab_size})")
        self.stop_token_ids = torch.tensor(stop, dtype=torch.long, device=self.device)

        reward_tokenizer = config.reward_tokenizer
        if reward_tokenizer is None and not isinstance(config.reward, (str, os.PathLike)):
            reward_tokenizer = self.tokenizer
        self.reward_fn = as_reward_function(
            config.reward,
            tokenizer=reward_tokenizer,
            device=self.device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            batch_size=config.reward_batch_size,
        )

        B, L = num_envs, self.max_length
        # Column L is a scratch column: rows that do not step this turn write their (ignored) token there.
        self.tokens = torch.full((B, L + 1), self.pad_id, dtype=torch.long, device=self.device)
        self.host_tokens = np.full((B, L + 1), self.pad_id, dtype=np.int64)
        self.prompt_len = np.zeros(B, dtype=np.int64)
        self.response_len = np.zeros(B, dtype=np.int64)
        self.prompt_index = np.full(B, -1, dtype=np.int64)
        self.has_logprobs = np.ones(B, dtype=bool)
        self.kl_sum = torch.zeros(B, dtype=torch.float32, device=self.device)
        self.return_sum = torch.zeros(B, dtype=torch.float32, device=self.device)
        self._length = torch.zeros(B, dtype=torch.long, device=self.device)
        self._columns = torch.arange(L, device=self.device)
        self._rows = torch.arange(B, device=self.device)
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs device='cuda', not {self.device}")
        self.lm: IncrementalLM | FusedDecoder | None = None
        if reference is not None and fuse:
            self.lm = FusedDecoder(reference, B, L, cuda_graph=config.cuda_graphs)
        elif reference is not None:
            self.lm = IncrementalLM(reference, B, L, context=context, cuda_graph=config.cuda_graphs)
        self.ref_logprobs: torch.Tensor | None = None  # (B, V) log pi_ref(. | s_t) of the current states
        self.ready = np.zeros(B, dtype=bool)
        self.closed = False

        # Multi-turn episodes (llm_env.multiturn): response_len counts every token after the prompt, the
        # agent's and the replies'; agent_len the agent's alone (its steps).
        self.responder = config.responder
        self.agent_len = np.zeros(B, dtype=np.int64)
        self.multi_turn = self.responder is not None
        if self.multi_turn:
            self.renderer = ReplyRenderer(
                self.tokenizer,
                chat=any(isinstance(p, ChatPrompt) for p in self.prompts) or config.chat_template,
            )
            self.agent_mask = torch.zeros((B, L + 1), dtype=torch.long, device=self.device)
            self.host_agent_mask = np.zeros((B, L + 1), dtype=np.int64)
            self.turn_start = np.zeros(B, dtype=np.int64)  # where each row's current agent turn began
            self.conversations: list[Conversation | None] = [None] * B

    def close(self) -> None:
        """Release the reference decoder and its cache; every later :meth:`reset_rows` or :meth:`step`
        raises (without the reference the KL penalty could no longer be paid)."""
        self.lm = None
        self.ref_logprobs = None
        self.closed = True

    def check_open(self) -> None:
        """Raise if :meth:`close` has been called."""
        if self.closed:
            raise RuntimeError(
                "the environment is closed (close() released its reference model, so it could no longer "
                "pay the KL penalty): make a new environment"
            )

    # ----------------------------------------------------------------------------------------- prompts
    def prompt_ids(self, index: int) -> np.ndarray:
        """Token ids of prompt ``index``."""
        return self._prompt_ids[index]

    # ------------------------------------------------------------------------------------------ state
    def reset_rows(self, rows: np.ndarray, indices: np.ndarray) -> None:
        """Start new episodes in ``rows`` with prompts ``indices`` (host arrays of equal length)."""
        self.check_open()
        rows = np.asarray(rows, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64)
        if rows.size == 0:
            return
        prompt_ids = [self.prompt_ids(int(i)) for i in indices]
        self.host_tokens[rows] = self.pad_id
        for row, ids in zip(rows, prompt_ids):
            self.host_tokens[row, : len(ids)] = ids
        rows_t = host_to_device(rows, self.device)
        self.tokens[rows_t] = host_to_device(self.host_tokens[rows], self.device)
        lengths = np.fromiter((len(ids) for ids in prompt_ids), dtype=np.int64, count=len(prompt_ids))
        self.prompt_len[rows] = lengths
        self.response_len[rows] = 0
        self.prompt_index[rows] = indices
        self.has_logprobs[rows] = True
        self._length[rows_t] = host_to_device(lengths, self.device)
        self.kl_sum[rows_t] = 0.0
        self.return_sum[rows_t] = 0.0
        self.agent_len[rows] = 0
        self.ready[rows] = True
        if self.multi_turn:
            self.agent_mask[rows_t] = 0
            self.host_agent_mask[rows] = 0
            self.turn_start[rows] = lengths
            for row, index in zip(rows, indices):
                self.conversations[row] = Conversation(self.prompts[int(index)], int(index))
        if self.lm is not None:
            ids, lens = left_pad(prompt_ids, self.pad_id, self.device)
            logits = self.lm.prefill(rows, ids, lens).logits
            if self.ref_logprobs is None:
                self.ref_logprobs = torch.zeros(
                    self.num_envs, logits.shape[-1], dtype=torch.float32, device=self.device
                )
            self.ref_logprobs[rows_t] = torch.log_softmax(logits, dim=-1)

    def observation(self) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (and with a responder ``agent_mask``), (B, L) int64 on the
        device (fresh tensors)."""
        input_ids = self.tokens[:, : self.max_length].clone()
        attention_mask = (self._columns[None, :] < self._length[:, None]).long()
        if isinstance(self.lm, FusedDecoder):
            self.lm.mark_observation(input_ids)  # the fused policy logits describe this observation
        if self.multi_turn:
            agent_mask = self.agent_mask[:, : self.max_length].clone()
            return {"input_ids": input_ids, "attention_mask": attention_mask, "agent_mask": agent_mask}
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def host_observation(self, row: int) -> dict[str, np.ndarray]:
        """The observation of one row as numpy arrays, built from the host mirror (no device read)."""
        length = self.prompt_len[row] + self.response_len[row]
        mask = np.zeros(self.max_length, dtype=np.int64)
        mask[:length] = 1
        obs = {"input_ids": self.host_tokens[row, : self.max_length].copy(), "attention_mask": mask}
        if self.multi_turn:
            obs["agent_mask"] = self.host_agent_mask[row, : self.max_length].copy()
        return obs

    def text(self, row: int) -> tuple[str, str]:
        """(prompt, response so far) of a row as text."""
        prompts, responses = self._texts(np.array([row]))
        return prompts[0], responses[0]

    def _texts(self, rows: np.ndarray, next_tokens: np.ndarray | None = None) -> tuple[list[str], list[str]]:
        """(prompts, responses) of ``rows``; ``next_tokens`` (one per row) is appended to the responses
        first, so a step can score its finished episodes before committing anything."""
        prompts = [self.prompts[int(self.prompt_index[r])] for r in rows]
        prompt_ids = [self.host_tokens[r, : self.prompt_len[r]] for r in rows]
        full_ids = [self.host_tokens[r, : self.prompt_len[r] + self.response_len[r]] for r in rows]
        if next_tokens is not None:
            full_ids = [np.append(ids, token) for ids, token in zip(full_ids, next_tokens)]
        heads = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
        fulls = self.tokenizer.batch_decode(full_ids, skip_special_tokens=True)
        responses = []
        for r, head, full, ids in zip(rows, heads, fulls, full_ids):
            if full.startswith(head):
                responses.append(full[len(head) :])
            else:  # tokenizers whose decoding is not prefix-stable
                responses.append(self.tokenizer.decode(ids[self.prompt_len[r] :], skip_special_tokens=True))
        return prompts, responses

    # ------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, logprobs: torch.Tensor | None, stepping: np.ndarray) -> StepResult:
        """Append ``tokens`` to the rows where ``stepping`` is True and compute their rewards.

        Args:
            tokens: (B,) int64 on the device. Rows that do not step may hold anything.
            logprobs: (B,) float log pi(a_t|s_t) on the device, or None. Read as numbers: an agent may
                pass its policy's output with its autograd graph; the step runs without autograd, so
                the graph reaches neither the running sums nor the returned rewards.
            stepping: (B,) host bool mask of the rows that take this action.

        All checks (action range, log-probabilities, the reward source's output) run before any state
        changes, so an exception leaves the batch exactly as it was.
        """
        B = self.num_envs
        self.check_open()
        if not self.ready[stepping].all():
            raise RuntimeError("step() called before reset(): reset the environment first")
        step_mask = host_to_device(stepping, self.device)
        inside = (tokens >= 0) & (tokens < self.vocab_size)
        safe = torch.where(step_mask & inside, tokens, torch.full_like(tokens, self.pad_id))
        checks = [safe, (~inside & step_mask).long(), torch.isin(safe, self.stop_token_ids).long()]
        if logprobs is not None:
            # A log-probability must be finite and <= 0 (a little slack for rounding).
            checks.append(((~torch.isfinite(logprobs) | (logprobs > 1e-4)) & step_mask).long())
        host = torch.stack(checks).cpu().numpy()  # the one device read of a step
        if host[1].any():
            bad = np.flatnonzero(host[1])
            hint = ""
            if self.vocab_size < self.model_vocab_size:
                hint = (
                    f" (action_vocab='tokenizer': the model's ids {self.vocab_size} to "
                    f"{self.model_vocab_size - 1} decode to no text)"
                )
            raise ValueError(
                f"actions out of the vocabulary [0, {self.vocab_size}) at sub-envs {bad.tolist()}: "
                f"{tokens[torch.from_numpy(bad).to(self.device)].tolist()}{hint}"
            )
        if logprobs is not None and host[3].any():
            bad = np.flatnonzero(host[3])
            raise ValueError(
                f"log-probabilities must be finite and <= 0; sub-envs {bad.tolist()} reported "
                f"{logprobs[torch.from_numpy(bad).to(self.device)].tolist()}"
            )
        host_tokens = host[0]
        is_stop = host[2].astype(bool) & stepping

        # Per-token KL reward.
        kl_t = None
        if self.ref_logprobs is not None:
            ref_lp = self.ref_logprobs.gather(1, safe[:, None]).squeeze(1)
            if logprobs is not None:
                kl_t = kl_penalty(logprobs.float(), ref_lp, self.config.kl_estimator)
                reward = -self.kl_coef * kl_t
            else:
                reward = self.kl_coef * ref_lp
        else:
            reward = torch.zeros(B, dtype=torch.float32, device=self.device)
        reward = torch.where(step_mask, reward, torch.zeros_like(reward))

        response_len = self.response_len + stepping
        budget = stepping & ~is_stop & (response_len >= self.max_new_tokens)  # ran out without a stop token
        terminated, truncated = is_stop, budget
        turn = _TurnOutcome.none(B)
        if self.multi_turn:  # the responder answers every turn that ended (it may raise: nothing changed yet)
            turn = self._answer(
                np.flatnonzero(stepping & (is_stop | budget)), host_tokens, is_stop, response_len
            )
            terminated = is_stop & ~turn.continues & ~turn.cut
            truncated = budget | turn.cut
        done = terminated | truncated
        finished = np.flatnonzero(done)

        # Score the finished responses before committing anything (the reward source may raise).
        if finished.size:
            prompts, responses = self._texts(finished, host_tokens[finished])
            if self.multi_turn:
                responses = [
                    Transcript(r, turn.conversations[int(row)]) for row, r in zip(finished, responses)
                ]
            scores = check_scores(self.reward_fn(prompts, responses), len(finished)).to(self.device)

        # Commit.
        positions = self.prompt_len + self.response_len
        step_rows = np.flatnonzero(stepping)
        self.host_tokens[step_rows, positions[step_rows]] = host_tokens[step_rows]
        columns = host_to_device(np.where(stepping, positions, self.max_length), self.device)
        self.tokens[self._rows, columns] = safe
        self.response_len = response_len
        self.agent_len += stepping
        self._length += step_mask
        if self.multi_turn:
            self.host_agent_mask[step_rows, positions[step_rows]] = 1
            self.agent_mask[self._rows, columns] = 1  # rows that did not step write the scratch column
            self._commit_replies(turn, positions)
        if kl_t is not None:
            self.kl_sum += torch.where(step_mask, kl_t, torch.zeros_like(kl_t))
        else:
            self.has_logprobs &= ~stepping
        if turn.replies:
            reward = reward + host_to_device(turn.rewards, self.device)
        completions: dict[str, np.ndarray] = {}
        if finished.size:
            finished_t = host_to_device(finished, self.device)
            final = scores.clone()
            if self.config.missing_eos_penalty is not None:
                final -= host_to_device(budget[finished].astype(np.float32), self.device) * float(
                    self.config.missing_eos_penalty
                )
            reward = reward.index_add(0, finished_t, final)
        self.return_sum += reward
        if finished.size:
            host_scores, host_kl, host_return = (
                torch.stack([scores, self.kl_sum[finished_t], self.return_sum[finished_t]])
                .double()
                .cpu()
                .numpy()
            )
            completions = {
                "prompt": np.array(prompts, dtype=object),
                "response": np.array(responses, dtype=object),
                "score": host_scores,
                "kl": host_kl,
                "return": host_return,
                "length": self.agent_len[finished].copy(),
                "eos": is_stop[finished],
                "prompt_index": self.prompt_index[finished].copy(),
                "has_kl": self.has_logprobs[finished] & (self.ref_logprobs is not None),
            }
            if self.multi_turn:
                conversations = [turn.conversations[int(row)] for row in finished]
                completions["turns"] = np.array([len(c.agent_turns) for c in conversations], dtype=np.int64)
                completions["conversation"] = np.empty(len(conversations), dtype=object)
                completions["conversation"][:] = conversations
        if self.lm is not None:
            # Only the rows that stepped advance; the others (finished, frozen, waiting) keep their cache
            # state, and their rows of ref_logprobs are not read before a reset_rows overwrites them.
            # A row a reply joined takes its token and the reply's in one chunk instead.
            logits = self.lm.decode(safe, advance=stepping & ~turn.continues).logits
            self.ref_logprobs = torch.log_softmax(logits, dim=-1)
            if turn.injected:
                rows = np.fromiter(turn.injected, dtype=np.int64)
                chunks = [np.concatenate([[host_tokens[r]], turn.injected[int(r)]]) for r in rows]
                padded, lengths = left_pad(chunks, self.pad_id, self.device)
                extended = self.lm.extend(rows, padded, lengths).logits
                self.ref_logprobs[host_to_device(rows, self.device)] = torch.log_softmax(extended, dim=-1)
        replies = {row: (turn.replies[row].text or "", ids) for row, ids in turn.injected.items()}
        return StepResult(reward.float(), terminated, truncated, finished, completions, replies)

    # ------------------------------------------------------------------------------------ multi-turn
    def _with_agent_turn(self, row: int, next_token: int) -> Conversation:
        """Row ``row``'s conversation with its current turn (up to and including ``next_token``) appended,
        as a new object (the committed one is untouched; the responder's ``state`` is shared)."""
        conversation = self.conversations[row]
        start, end = self.turn_start[row], self.prompt_len[row] + self.response_len[row]
        ids = np.append(self.host_tokens[row, start:end], next_token)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        turns = [*conversation.turns, Turn(AGENT, text, tuple(int(t) for t in ids))]
        return dataclasses.replace(conversation, turns=turns)

    def _answer(
        self, rows: np.ndarray, host_tokens: np.ndarray, is_stop: np.ndarray, response_len: np.ndarray
    ) -> _TurnOutcome:
        """Record the turn that ended in each of ``rows`` and ask the responder to answer those ended by a
        stop token (a turn cut by the budget ends the episode unanswered); decide what happens to each row.
        Changes nothing, so that a responder that raises leaves the environment as it was."""
        outcome = _TurnOutcome.none(self.num_envs)
        limit = self.config.max_turns
        for row in rows:
            row = int(row)
            conversation = self._with_agent_turn(row, host_tokens[row])
            outcome.conversations[row] = conversation
            if not is_stop[row]:
                continue
            try:
                reply = as_reply(self.responder(conversation))
            except Exception as exc:
                raise RuntimeError(
                    f"the responder raised {exc!r} on sub-env {row}'s turn {len(conversation.agent_turns)}; "
                    "the environment is as it was before this step"
                ) from exc
            outcome.replies[row] = reply
            outcome.rewards[row] = reply.reward
            if reply.text is None:
                continue  # the responder ends the episode: terminated
            ids = np.asarray(self.renderer(reply), dtype=np.int64)
            room = self.max_new_tokens - response_len[row] - 1  # one token must stay for the agent to answer
            if (limit is not None and len(conversation.agent_turns) >= limit) or len(ids) > room:
                outcome.cut[row] = True  # the turn limit, or a reply that does not fit: truncated
            else:
                outcome.continues[row] = True
                outcome.injected[row] = ids
        return outcome

    def _commit_replies(self, turn: _TurnOutcome, positions: np.ndarray) -> None:
        """Append the replies' tokens after the agent's token in their rows and record the new turns."""
        for row, conversation in turn.conversations.items():
            self.conversations[row] = conversation
        if not turn.injected:
            return
        grown = np.zeros(self.num_envs, dtype=np.int64)  # reply tokens appended to each row
        cols, rows, values = [], [], []
        for row, ids in turn.injected.items():
            start = positions[row] + 1
            reply = turn.replies[row]
            self.conversations[row].turns.append(
                Turn(reply.role, reply.text or "", tuple(int(t) for t in ids))
            )
            self.host_tokens[row, start : start + len(ids)] = ids
            rows.append(np.full(len(ids), row))
            cols.append(np.arange(start, start + len(ids)))
            values.append(ids)
            grown[row] = len(ids)
            self.turn_start[row] = start + len(ids)
        rows_t = host_to_device(np.concatenate(rows), self.device)
        cols_t = host_to_device(np.concatenate(cols), self.device)
        self.tokens[rows_t, cols_t] = host_to_device(np.concatenate(values), self.device)
        self.response_len += grown
        self._length += host_to_device(grown, self.device)


@dataclass
class _TurnOutcome:
    """What the responder decided at one step (multi-turn episodes), before anything is committed."""

    continues: np.ndarray  # (B,) bool: a reply joined the context, the episode goes on
    cut: np.ndarray  # (B,) bool: answered, but the turn limit or the reply's length ends the episode
    rewards: np.ndarray  # (B,) per-turn rewards, paid on the agent's last token of the turn
    conversations: dict[int, Conversation] = dataclasses.field(default_factory=dict)  # with the turn added
    replies: dict[int, Reply] = dataclasses.field(default_factory=dict)
    injected: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # the reply tokens appended

    @classmethod
    def none(cls, num_envs: int) -> _TurnOutcome:
        return cls(
            np.zeros(num_envs, dtype=bool),
            np.zeros(num_envs, dtype=bool),
            np.zeros(num_envs, dtype=np.float32),
        )
