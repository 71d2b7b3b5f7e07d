"""A turn-level text environment (a game, a tool) as the responder of a token-level multi-turn task.

The ecosystem's environment libraries (GEM, TextArena, ...) step whole turns: ``reset`` gives a text
observation, ``step(text)`` plays the agent's turn and gives the next observation and a reward.
:class:`TurnLevelTask` turns any such environment into the three things a multi-turn
:class:`llm_env.TextGenVectorEnv` takes (:mod:`llm_env.multiturn`):

* ``prompts``: prompt ``i`` is the game's first observation after a reset with seed ``seed + i``;
* ``responder``: each episode plays its own game, reset with its prompt's seed (so it is the game the prompt
  describes), stepped with the text of each agent turn; the game's next observation is the reply injected
  into the context, the step's reward is paid on the agent's last token of the turn, and the game's end
  ends the episode (``Reply(None, reward)``);
* ``reward``: zero, since every reward of the game has been paid on the turn that earned it.

Determinism: the games of GEM and TextArena draw from Python's global ``random`` (and numpy's), which
their ``reset(seed)`` re-seeds. Each episode's game runs with a random state of its own, swapped in around
every call and out again, so episodes interleaved in a batch do not draw from one another's stream, the
caller's global random state is left untouched, and the same seed plays the same games.

Robustness: the environment may ask the same turn again (when another row's responder or the reward
source raised, nothing of the step was committed; :meth:`llm_env.core.EpisodeBatch.step`). The responder
then returns the reply it already gave, and when the moves differ from what its game has played (the same
step retried with other actions, a pickled conversation) it replays the episode's moves on a fresh game of
the same seed.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm_env.multiturn import Conversation, Reply

__all__ = ["GameStep", "TurnLevelTask"]

STATE_KEY = "turn_level_game"
"""Where an episode's game lives in :attr:`llm_env.multiturn.Conversation.state`."""


@dataclass(frozen=True)
class GameStep:
    """What a turn-level game answered to one move."""

    observation: str
    """The text the game shows the agent next (the reply; kept in the episode's record when the game ends)."""
    reward: float
    """The reward of this move."""
    done: bool
    """Whether the game is over (terminated or truncated by its own rules)."""


@dataclass
class GameEpisode:
    """One episode's game and its record, kept in ``conversation.state[STATE_KEY]``.

    ``first_observation`` is the game's text after its reset (the prompt), ``moves`` the agent turns played,
    ``replies`` the replies returned for them, ``rewards`` the game's rewards, ``final_observation`` the
    game's last text (not injected: the episode ends with it). The live
    game and its random state are dropped when pickled; the responder replays ``moves`` if it needs them.
    """

    prompt_index: int
    seed: int
    game: Any = None
    rng: tuple[Any, Any] | None = None
    moves: list[str] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    first_observation: str = ""
    final_observation: str | None = None

    @property
    def done(self) -> bool:
        """Whether the game has ended: its last reply ended the episode (a reply without text)."""
        return bool(self.replies) and self.replies[-1].text is None

    @property
    def total_reward(self) -> float:
        """The sum of the game's rewards over the moves played so far."""
        return float(sum(self.rewards))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "game": None, "rng": None}


@contextmanager
def _game_rng(episode: GameEpisode) -> Iterator[None]:
    """Run the block with ``episode``'s own global random state (seeded with its seed the first time).

    The legacy numpy global state on purpose: it is what the games draw from (``np.random.seed`` in GEM)."""
    outer = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        if episode.rng is None:
            random.seed(episode.seed)
            np.random.seed(episode.seed)  # noqa: NPY002
        else:
            random.setstate(episode.rng[0])
            np.random.set_state(episode.rng[1])  # noqa: NPY002
        yield
    finally:
        episode.rng = random.getstate(), np.random.get_state()  # noqa: NPY002
        random.setstate(outer[0])
        np.random.set_state(outer[1])  # noqa: NPY002


class TurnLevelTask(abc.ABC):
    """A turn-level text environment as a token-level multi-turn task: prompts, responder and reward.

    Subclasses say how to make, reset and step one game (:class:`llm_env.adapters.GemTask`,
    :class:`llm_env.adapters.TextArenaTask`); everything else is here.

    Args:
        env_id: the game's id in its library's registry.
        num_prompts: how many games (seeds ``seed`` to ``seed + num_prompts - 1``) the prompts cover.
        seed: the seed of prompt 0.
        max_turns: the environment's turn limit (``EnvConfig.max_turns``); ``None``: the game's own rules and
            ``max_new_tokens`` end episodes.
        chat: the prompts are rendered as user messages with the tokenizer's chat template
            (``EnvConfig.chat_template``) and replies as user turns; otherwise plain text, with a newline
            after the prompt and around each reply.
        make_kwargs: passed to the library's ``make``.

    Usage::

        task = GemTask("game:GuessTheNumber-v0-easy", num_prompts=64)
        envs = llm_env.TextGenVectorEnv(num_envs=8, tokenizer=tok, reference=sft, **task.env_kwargs())
    """

    library: str = "turn-level"
    """The library's name, for error messages."""

    def __init__(
        self,
        env_id: str,
        *,
        num_prompts: int = 64,
        seed: int = 0,
        max_turns: int | None = None,
        chat: bool = False,
        **make_kwargs: Any,
    ) -> None:
        if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
            raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.import_library()
        self.env_id = env_id
        self.num_prompts = num_prompts
        self.seed = seed
        self.max_turns = max_turns
        self.chat = chat
        self.make_kwargs = make_kwargs
        prompts = []
        for index in range(num_prompts):  # one game object per prompt, as each episode will have
            episode = self.start(index)
            prompts.append(episode.first_observation if chat else _line(episode.first_observation))
            self.close_game(episode.game)
        self.prompts: list[str] = prompts
        """Prompt ``i``: the first observation of the game reset with seed ``seed + i``."""

    # ------------------------------------------------------------------------------- the library's side
    def import_library(self) -> None:  # noqa: B027 - a task over code of its own imports nothing
        """Import the optional library, or raise an ImportError that says how to install it."""

    @abc.abstractmethod
    def make_game(self) -> Any:
        """A new game object (``self.env_id``, ``self.make_kwargs``)."""

    @abc.abstractmethod
    def reset_game(self, game: Any, seed: int) -> str:
        """Reset ``game`` with ``seed``; its first observation as text."""

    @abc.abstractmethod
    def step_game(self, game: Any, action: str) -> GameStep:
        """Play the agent's turn ``action`` in ``game``."""

    def close_game(self, game: Any) -> None:  # noqa: B027 - most games need no closing
        """Release ``game`` (called when a game is dropped after its last move or its prompts)."""

    # ------------------------------------------------------------------------------ the environment's side
    def responder(self, conversation: Conversation) -> Reply:
        """The game's answer to the agent's turn just ended (:data:`llm_env.multiturn.Responder`)."""
        moves = conversation.agent_turns
        episode = conversation.state.get(STATE_KEY)
        if episode is not None and episode.moves == moves:
            return episode.replies[-1]  # the same turn asked again: the step was retried
        if episode is None or episode.game is None or episode.moves != moves[:-1]:
            episode = self.start(conversation.prompt_index)  # a fresh game, the earlier moves replayed
            conversation.state[STATE_KEY] = episode
            for move in moves[:-1]:
                self._play(episode, move)
        return self._play(episode, moves[-1])

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The reward source: 0 for every conversation, the game's rewards having been paid per turn."""
        return [0.0] * len(responses)

    def env_kwargs(self) -> dict[str, Any]:
        """The :class:`llm_env.EnvConfig` fields of this task: ``prompts``, ``responder``, ``reward``,
        ``max_turns`` and ``chat_template``."""
        return {
            "prompts": self.prompts,
            "responder": self.responder,
            "reward": self.reward,
            "max_turns": self.max_turns,
            "chat_template": self.chat,
        }

    def reply_text(self, observation: str) -> str:
        """How an observation joins the context: as it is in a chat turn, between newlines in plain text."""
        return observation if self.chat else "\n" + _line(observation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.env_id!r}, num_prompts={self.num_prompts}, seed={self.seed}, "
            f"max_turns={self.max_turns}, chat={self.chat})"
        )

    def start(self, prompt_index: int) -> GameEpisode:
        """A fresh game of prompt ``prompt_index``, reset with its seed: the game that prompt describes."""
        if not 0 <= prompt_index < self.num_prompts:
            raise IndexError(f"prompt {prompt_index} is not one of this task's {self.num_prompts} prompts")
        episode = GameEpisode(prompt_index, self.seed + prompt_index)
        with _game_rng(episode):
            episode.game = self._call("make", self.make_game, episode)
            episode.first_observation = self._call(
                "reset", lambda: self.reset_game(episode.game, episode.seed), episode
            )
        return episode

    # ------------------------------------------------------------------------------------------ helpers
    def _play(self, episode: GameEpisode, move: str) -> Reply:
        if episode.done:
            raise RuntimeError(f"{self._name(episode)} is over: it cannot play move {len(episode.moves) + 1}")
        with _game_rng(episode):
            step = self._call(
                f"move {len(episode.moves) + 1} ({move!r:.60})",
                lambda: self.step_game(episode.game, move),
                episode,
            )
        reward = float(step.reward)
        reply = Reply(None if step.done else self.reply_text(step.observation), reward=reward)
        episode.moves.append(move)
        episode.replies.append(reply)
        episode.rewards.append(reward)
        if step.done:
            episode.final_observation = step.observation
            self.close_game(episode.game)
            episode.game = None
        return reply

    def _call(self, what: str, fn: Any, episode: GameEpisode) -> Any:
        """``fn()``, an exception naming the game, the prompt, the seed and the call that raised."""
        try:
            return fn()
        except Exception as exc:
            episode.game = None if what.startswith("move") else episode.game  # replayed if asked again
            raise RuntimeError(f"{self._name(episode)} raised at {what}: {exc!r}") from exc

    def _name(self, episode: GameEpisode) -> str:
        return f"{self.library} game {self.env_id!r} (prompt {episode.prompt_index}, seed {episode.seed})"


def _line(text: str) -> str:
    """``text`` ending with one newline (GEM's ``maybe_add_new_line``)."""
    return text if text.endswith("\n") else text + "\n"
