"""The agent protocol and the loop that runs any agent through a TextGenVectorEnv.

An agent needs one method to act, :meth:`Agent.act`, and, if it learns, one more, :meth:`Agent.learn`.
:func:`collect_episodes` steps the environment with the agent and returns the finished episodes as
:class:`Trajectories`: per-episode prompt and response token ids with the per-token log-probabilities and
environment rewards, plus what the environment reported at the end of each episode (reward-model score,
KL, texts). Everything stays on the environment's device; the only host reads are the environment's
own (B token ids and flags per step).

What the collector guarantees: the episodes it returns are the first ``num_episodes`` episodes to *start*,
each counted from the step it starts, and it steps until every one of them has finished. Whether an
episode is collected never depends on its own length, so the responses it returns (their lengths, scores,
everything) are distributed as the policy's. Stopping at the first ``num_episodes`` episodes to *finish*
instead would keep the short responses of a batch and drop the long ones still running, a bias towards
short responses in every update (tested with a policy whose response length is random).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.vector import AutoresetMode
from torch.nn.utils.rnn import pad_sequence

from agents.policy import SequenceBatch
from llm_env import TextGenVectorEnv, TokenActions

__all__ = ["Agent", "LearningAgent", "Trajectories", "collect_episodes"]


@runtime_checkable
class Agent(Protocol):
    """What an agent implements to run against :class:`~llm_env.TextGenVectorEnv`."""

    def act(self, obs: dict[str, torch.Tensor], restarted: np.ndarray) -> TokenActions | torch.Tensor:
        """Choose the next token of every sub-environment.

        Args:
            obs: the environment's observation, ``input_ids`` and ``attention_mask`` of shape (B, L).
            restarted: (B,) host bool array, True where the sub-environment holds a new prompt since
                the previous call (all True after ``reset``). Agents with a KV cache prefill these rows.

        Returns:
            ``TokenActions(tokens, logprobs)`` with the log-probabilities of the chosen tokens under the
            acting policy (the environment computes the exact KL penalty from them), or bare token ids.
        """
        ...


@runtime_checkable
class LearningAgent(Agent, Protocol):
    """An agent that also updates itself from collected episodes."""

    def learn(self, trajectories: Trajectories) -> dict[str, float]:
        """Update from finished episodes; return diagnostics to log."""
        ...


@dataclass
class Trajectories:
    """N finished episodes. Per-token tensors are (N, T), right-padded; ``mask`` marks real tokens."""

    prompt_ids: list[torch.Tensor]  # N tensors (P_n,)
    response_ids: torch.Tensor  # (N, T)
    logprobs: torch.Tensor  # (N, T) behaviour log-probabilities (NaN if the agent did not report them)
    rewards: torch.Tensor  # (N, T) per-token environment rewards (KL penalty + final score)
    mask: torch.Tensor  # (N, T) bool
    scores: np.ndarray  # (N,) reward-model scores
    kl: np.ndarray  # (N,) summed KL estimate from the environment (NaN when unknown)
    returns: np.ndarray  # (N,) summed environment rewards
    lengths: np.ndarray  # (N,) response lengths
    eos: np.ndarray  # (N,) ended with a stop token
    prompt_index: np.ndarray  # (N,)
    prompts: list[str]
    responses: list[str]
    steps: int = 0  # environment steps taken to collect them
    pad_token_id: int = 0  # the value padding response_ids
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. max_new_tokens: the environment's budget
    # Multi-turn episodes (an environment with a responder), else None: everything after the prompt, the
    # agent's tokens and the replies, (N, C) right-padded, and True on the agent's tokens (whose k-th is
    # response_ids[:, k]); a conversation ends with the agent's last token. turns: agent turns per episode.
    conversation_ids: torch.Tensor | None = None
    agent_mask: torch.Tensor | None = None
    turns: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Response tokens in these episodes (the tokens sampled to collect them)."""
        return int(self.lengths.sum())

    def response_list(self) -> list[torch.Tensor]:
        """The agent's token ids without padding, one tensor per episode (its actions, in order)."""
        return [row[: int(n)] for row, n in zip(self.response_ids, self.lengths)]

    @property
    def multi_turn(self) -> bool:
        """Whether the episodes are conversations (replies between the agent's turns)."""
        return self.agent_mask is not None

    def conversation_list(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per episode, everything after the prompt and the mask of the agent's tokens in it (None for
        single-turn episodes, whose response is all the agent's): what a teacher-forced pass conditions on."""
        if self.agent_mask is None:
            return self.response_list(), [None] * len(self)
        ends = self.conversation_lengths()
        ids = [row[:n] for row, n in zip(self.conversation_ids, ends)]
        return ids, [row[:n] for row, n in zip(self.agent_mask, ends)]

    def conversation_lengths(self) -> np.ndarray:
        """(N,) tokens after the prompt (the agent's and the replies'); the response lengths if single-turn."""
        if self.agent_mask is None:
            return self.lengths.copy()
        width = self.agent_mask.shape[1]
        last = width - 1 - torch.flip(self.agent_mask, dims=[1]).int().argmax(dim=1)  # the last agent token
        return (last + 1).cpu().numpy()

    def sequences(self, *, pad_id: int, device: torch.device | str) -> SequenceBatch:
        """The episodes as one :class:`~agents.policy.SequenceBatch` (prompt + everything after it), scoring
        the agent's tokens only: row ``n``, column ``k`` is the agent's ``k``-th token of episode ``n``, aligned
        with ``logprobs``, ``rewards`` and ``mask``."""
        responses, masks = self.conversation_list()
        return SequenceBatch.build(
            self.prompt_ids,
            responses,
            pad_id=pad_id,
            device=device,
            agent_masks=None if not self.multi_turn else masks,
        )

    def select(self, index: Sequence[int] | np.ndarray) -> Trajectories:
        """The episodes ``index`` (in that order), padding trimmed to their longest response; ``steps`` and
        ``extras`` are kept as they are (they describe the collection)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size == 0:
            raise ValueError("select needs at least one episode index")
        if index.min() < 0 or index.max() >= len(self):
            raise IndexError(f"episode indices must be in [0, {len(self)}), got {index.min()}..{index.max()}")
        rows = torch.as_tensor(index, device=self.response_ids.device)
        width = int(self.lengths[index].max())
        return Trajectories(
            prompt_ids=[self.prompt_ids[i] for i in index],
            response_ids=self.response_ids[rows, :width],
            logprobs=self.logprobs[rows, :width],
            rewards=self.rewards[rows, :width],
            mask=self.mask[rows, :width],
            scores=self.scores[index],
            kl=self.kl[index],
            returns=self.returns[index],
            lengths=self.lengths[index],
            eos=self.eos[index],
            prompt_index=self.prompt_index[index],
            prompts=[self.prompts[i] for i in index],
            responses=[self.responses[i] for i in index],
            steps=self.steps,
            pad_token_id=self.pad_token_id,
            extras=dict(self.extras),
            **self._select_conversations(index, rows),
        )

    def _select_conversations(self, index: np.ndarray, rows: torch.Tensor) -> dict[str, Any]:
        if self.agent_mask is None:
            return {}
        width = int(self.conversation_lengths()[index].max())
        return {
            "conversation_ids": self.conversation_ids[rows, :width],
            "agent_mask": self.agent_mask[rows, :width],
            "turns": self.turns[index],
        }

    @classmethod
    def cat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        """The episodes of ``parts`` one after the other (``steps`` summed, ``extras`` of the first part)."""
        if not parts:
            raise ValueError("cat needs at least one Trajectories")
        width = max(part.response_ids.shape[1] for part in parts)

        def stack(name: str, value: float | bool | int) -> torch.Tensor:
            tensors = [getattr(part, name) for part in parts]
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])

        return cls(
            prompt_ids=[p for part in parts for p in part.prompt_ids],
            response_ids=stack("response_ids", parts[0].pad_token_id),
            logprobs=stack("logprobs", 0.0),
            rewards=stack("rewards", 0.0),
            mask=stack("mask", False),
            scores=np.concatenate([part.scores for part in parts]),
            kl=np.concatenate([part.kl for part in parts]),
            returns=np.concatenate([part.returns for part in parts]),
            lengths=np.concatenate([part.lengths for part in parts]),
            eos=np.concatenate([part.eos for part in parts]),
            prompt_index=np.concatenate([part.prompt_index for part in parts]),
            prompts=[p for part in parts for p in part.prompts],
            responses=[r for part in parts for r in part.responses],
            steps=sum(part.steps for part in parts),
            pad_token_id=parts[0].pad_token_id,
            extras=dict(parts[0].extras),
            **_cat_conversations(parts),
        )


def _cat_conversations(parts: Sequence[Trajectories]) -> dict[str, Any]:
    kinds = {part.multi_turn for part in parts}
    if kinds == {False}:
        return {}
    if len(kinds) > 1:
        raise ValueError("cannot concatenate multi-turn and single-turn Trajectories")
    width = max(part.conversation_ids.shape[1] for part in parts)
    pad = parts[0].pad_token_id
    return {
        "conversation_ids": torch.cat(
            [F.pad(p.conversation_ids, (0, width - p.conversation_ids.shape[1]), value=pad) for p in parts]
        ),
        "agent_mask": torch.cat(
            [F.pad(p.agent_mask, (0, width - p.agent_mask.shape[1]), value=False) for p in parts]
        ),
        "turns": np.concatenate([part.turns for part in parts]),
    }


def _completion_rows(info: dict[str, Any]) -> np.ndarray:
    return np.flatnonzero(info["_completion"]) if "completion" in info else np.zeros(0, dtype=np.int64)


def collect_episodes(
    env: TextGenVectorEnv,
    agent: Agent,
    num_episodes: int,
    *,
    seed: int | None = None,
    prompt_indices: Sequence[int] | np.ndarray | None = None,
) -> Trajectories:
    """Run ``agent`` in ``env`` until the first ``num_episodes`` episodes to start have all finished.

    The environment is reset first (with ``seed``). An episode counts from the step it starts: the first
    ``min(num_envs, num_episodes)`` sub-environments at the reset, then every restart until
    ``num_episodes`` episodes have started; the loop then steps until all of them have ended. Which
    episodes are collected is thus decided before any of them has a length, and the returned responses are
    an unbiased sample of the policy's (a short response is no likelier to be collected than a long one).

    With ``AutoresetMode.NEXT_STEP`` the environment restarts sub-environments itself; the episodes that
    start after the first ``num_episodes`` are not counted (their steps are wasted while the last counted
    ones finish). With ``AutoresetMode.DISABLED`` this loop restarts finished sub-environments only while
    more episodes are needed, so nothing is wasted, and ``prompt_indices`` (one per episode, in order) can
    force the prompts, e.g. each prompt k times for best-of-k. Episodes come back in the order they
    started (episode ``i`` answers ``prompt_indices[i]`` when prompts are forced).
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    num_envs = env.num_envs
    manual = env.metadata["autoreset_mode"] == AutoresetMode.DISABLED
    queue = None
    if prompt_indices is not None:
        if not manual:
            raise ValueError("prompt_indices needs an environment with autoreset_mode=AutoresetMode.DISABLED")
        queue = [int(i) for i in prompt_indices]
        if len(queue) != num_episodes:
            raise ValueError(f"got {len(queue)} prompt_indices for {num_episodes} episodes")

    first = min(num_envs, num_episodes)
    reset_mask = np.zeros(num_envs, dtype=bool)
    reset_mask[:first] = True
    options: dict[str, Any] = {"reset_mask": reset_mask} if manual else {}
    if queue is not None:
        options["prompt_indices"] = np.array(queue[:first])
    obs, info = env.reset(seed=seed, options=options or None)
    started = first
    restarted = np.ones(num_envs, dtype=bool) if not manual else reset_mask.copy()
    active = reset_mask.copy()  # rows whose current episode counts
    start_step = np.zeros(num_envs, dtype=np.int64)
    position = np.arange(num_envs, dtype=np.int64)  # start order of each row's current episode

    tokens_t, logprobs_t, rewards_t = [], [], []
    injected: dict[tuple[int, int], tuple[int, ...]] = {}  # (row, step) -> the reply's token ids
    finished: list[tuple[int, int, int, dict[str, Any]]] = []  # (row, first step, last step, completion)
    step = 0
    while len(finished) < num_episodes:
        action = agent.act(obs, restarted)
        obs, reward, _, _, info = env.step(action)
        if isinstance(action, TokenActions):
            tokens, logprobs = torch.as_tensor(action.tokens), torch.as_tensor(action.logprobs).float()
        else:
            tokens, logprobs = torch.as_tensor(action), None
        tokens_t.append(tokens.to(env.device))
        logprobs_t.append(
            logprobs.to(env.device)
            if logprobs is not None
            else torch.full((num_envs,), float("nan"), device=env.device)
        )
        rewards_t.append(reward)
        restarted = np.zeros(num_envs, dtype=bool)
        if "_injected_ids" in info:  # multi-turn: the replies that followed the agent's token of this step
            for row in np.flatnonzero(info["_injected_ids"] & active):
                injected[(int(row), step)] = info["injected_ids"][row]
        done_rows = _completion_rows(info)
        completion = info.get("completion", {})
        for row in done_rows:
            if active[row]:
                record = {key: completion[key][row] for key in completion if not key.startswith("_")}
                if not completion.get("_kl", np.zeros(num_envs, dtype=bool))[row]:
                    record["kl"] = float("nan")
                finished.append(
                    (int(row), int(start_step[row]), step, {**record, "_position": int(position[row])})
                )
        active[done_rows] = False
        if manual:
            wanted = min(num_episodes - started, len(done_rows))
            if wanted > 0:
                rows = done_rows[:wanted]
                mask = np.zeros(num_envs, dtype=bool)
                mask[rows] = True
                options = {"reset_mask": mask}
                if queue is not None:
                    options["prompt_indices"] = np.array(queue[started : started + wanted])
                obs, _ = env.reset(options=options)
                restarted[rows] = True
                _start(rows, started, step, active, position, start_step)
                started += wanted
        elif "_prompt_index" in info:  # NEXT_STEP restarted these rows; count their episodes while needed
            rows = np.flatnonzero(info["_prompt_index"])
            restarted[rows] = True
            counted = rows[: max(0, num_episodes - started)]
            _start(counted, started, step, active, position, start_step)
            started += len(counted)
        if manual and not active.any() and len(finished) < num_episodes:
            raise RuntimeError("no counted episode is running but episodes are missing")  # defensive
        step += 1
    finished.sort(key=lambda episode: episode[3]["_position"])
    trajectories = _assemble(env, finished, tokens_t, logprobs_t, rewards_t, step, injected)
    trajectories.extras["max_new_tokens"] = env.config.max_new_tokens
    return trajectories


def _start(rows, first_position, step, active, position, start_step) -> None:
    """Count the episodes starting in ``rows`` at the next step, in row order from ``first_position``."""
    active[rows] = True
    position[rows] = np.arange(first_position, first_position + len(rows))
    start_step[rows] = step + 1


def _conversations(env, finished, tokens, injected) -> dict[str, Any]:
    """Each episode's tokens after its prompt, the agent's interleaved with the replies exactly as the
    environment appended them, and the mask of the agent's; empty for a single-turn environment."""
    if "agent_mask" not in env.single_observation_space.spaces:
        return {}
    host = tokens.cpu().numpy()  # (S, B), read once per rollout
    ids, masks = [], []
    for row, first, last, record in finished:
        sequence, agent = [], []
        for step in range(first, last + 1):
            reply = injected.get((row, step), ())
            sequence += [int(host[step, row]), *reply]
            agent += [True] + [False] * len(reply)
        expected = [t for turn in record["conversation"].turns for t in turn.token_ids]
        if sequence != expected:  # bookkeeping guard: the environment's own record of the conversation
            raise RuntimeError("an episode's conversation disagrees with the environment's record")
        ids.append(torch.tensor(sequence, dtype=torch.long))
        masks.append(torch.tensor(agent, dtype=torch.bool))
    return {
        "conversation_ids": pad_sequence(ids, batch_first=True, padding_value=env.pad_token_id).to(
            env.device
        ),
        "agent_mask": pad_sequence(masks, batch_first=True).to(env.device),
        "turns": np.array([record["turns"] for *_, record in finished], dtype=np.int64),
    }


def _assemble(env, finished, tokens_t, logprobs_t, rewards_t, steps, injected) -> Trajectories:
    tokens = torch.stack(tokens_t)  # (S, B)
    logprobs = torch.stack(logprobs_t)
    rewards = torch.stack(rewards_t)
    responses, behaviour, per_token = [], [], []
    for row, first, last, _ in finished:
        responses.append(tokens[first : last + 1, row])
        behaviour.append(logprobs[first : last + 1, row])
        per_token.append(rewards[first : last + 1, row])
    records = [record for *_, record in finished]
    response_ids = pad_sequence(responses, batch_first=True, padding_value=env.pad_token_id)
    mask = pad_sequence([torch.ones_like(r, dtype=torch.bool) for r in responses], batch_first=True)
    prompt_index = np.array([r["prompt_index"] for r in records], dtype=np.int64)
    lengths = np.array([r["length"] for r in records], dtype=np.int64)
    if not np.array_equal(lengths, [last - first + 1 for _, first, last, _ in finished]):
        raise RuntimeError("episode lengths disagree with the environment's report")  # bookkeeping guard
    return Trajectories(
        prompt_ids=[torch.as_tensor(env.prompt_token_ids(i), device=env.device) for i in prompt_index],
        response_ids=response_ids,
        logprobs=pad_sequence(behaviour, batch_first=True),
        rewards=pad_sequence(per_token, batch_first=True),
        mask=mask,
        scores=np.array([r["score"] for r in records], dtype=np.float64),
        kl=np.array([r["kl"] for r in records], dtype=np.float64),
        returns=np.array([r["return"] for r in records], dtype=np.float64),
        lengths=lengths,
        eos=np.array([r["eos"] for r in records], dtype=bool),
        prompt_index=prompt_index,
        prompts=[str(r["prompt"]) for r in records],
        # The texts; a multi-turn episode's is a Transcript, a str that also carries the conversation.
        responses=[r["response"] if isinstance(r["response"], str) else str(r["response"]) for r in records],
        steps=steps,
        pad_token_id=int(env.pad_token_id),
        **_conversations(env, finished, tokens, injected),
    )
