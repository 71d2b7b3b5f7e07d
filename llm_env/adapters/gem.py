"""GEM's environments as token-level multi-turn tasks.

GEM (General Experience Maker, Liu et al. 2025, https://github.com/axon-rl/gem, ``pip install gem-llm``)
is a Gym-like library of turn-level text environments for LLM agents: games (``game:GuessTheNumber-v0-easy``,
``game:Mastermind-v0-easy``, ``game:Minesweeper-v0-easy``, ...), math, code, QA and tool wrappers. Its
``Env`` has ``reset(seed) -> (observation, info)`` and ``step(action) -> (observation, reward, terminated,
truncated, info)`` over text.

:class:`GemTask` plays one of them under a token-level agent (see :class:`llm_env.adapters.TurnLevelTask`
for the mapping): the observation after ``reset`` is the prompt, the observation after each ``step`` the
reply, each step's reward is paid on the turn's last token, and ``terminated or truncated`` ends the
episode. Texts are shown as GEM's own ``ObservationWrapper`` shows its newest observation:
``info["prefix"] + observation + "\\n" + info["suffix"]`` (GEM's games put "Enter your next guess." in the
suffix); the history is not repeated, since the token-level context already holds it.

Offline: GuessTheNumber, Mastermind, Minesweeper, Sudoku, TowerofHanoi, FifteenPuzzle, Game2048, Sokoban
and Crosswords (each checked to play a move with gem-llm 0.1.0). Wordle, Hangman and WordSearch load NLTK's
word corpus (a download), the math, code and QA environments datasets from the hub, and the tool wrappers
(search, MCP) need servers.

Version: written against gem-llm 0.1.0, whose games draw from Python's global ``random`` (``reset(seed)``
re-seeds it; the adapter gives each game a random state of its own). Installing gem-llm with its
dependencies pins reasoning-gym 0.1.23, older than the benchmark's tasks need: next to ``.[tasks]``,
``pip install --no-deps gem-llm`` (its games need nothing more).
"""

from __future__ import annotations

import logging
from typing import Any

from llm_env.adapters.base import GameStep, TurnLevelTask, _line

__all__ = ["GemTask"]


def _gem() -> Any:
    """The ``gem`` module; its import configures the root logger (``logging.basicConfig(level=INFO)``),
    which is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import gem
    except ImportError as error:
        raise ImportError(
            'GemTask needs GEM: pip install -e ".[gem]" (or pip install --no-deps "gem-llm>=0.1,<0.2" '
            "next to reasoning-gym>=0.1.25)"
        ) from error
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return gem


class GemTask(TurnLevelTask):
    """A GEM environment (``gem.make(env_id, **make_kwargs)``) as a token-level multi-turn task.

    Usage::

        task = GemTask("game:GuessTheNumber-v0-easy", num_prompts=64, seed=0)
        envs = llm_env.TextGenVectorEnv(num_envs=8, tokenizer=tok, reference=sft, **task.env_kwargs())

    Rewards are GEM's (``gem.utils.constants.LanguageGameReward`` for the games: 1 for a win, -0.1 for a move
    it cannot parse, which ends the game, 0 otherwise; some games pay partial credit at their turn limit).
    """

    library = "GEM"

    def import_library(self) -> None:
        _gem()

    def make_game(self) -> Any:
        return _gem().make(self.env_id, **self.make_kwargs)

    def reset_game(self, game: Any, seed: int) -> str:
        observation, info = game.reset(seed=seed)
        return _framed(observation, info)

    def step_game(self, game: Any, action: str) -> GameStep:
        observation, reward, terminated, truncated, info = game.step(action)
        done = bool(terminated or truncated)
        return GameStep(observation if done else _framed(observation, info), float(reward), done)


def _framed(observation: Any, info: dict[str, Any]) -> str:
    """``observation`` as GEM's ``ObservationWrapper`` frames its newest one (prefix, newline, suffix)."""
    if not isinstance(observation, str):
        raise TypeError(f"GEM returned a {type(observation).__name__} observation; GemTask needs text")
    text = _line(observation) if observation else ""  # GEM's maybe_add_new_line
    return info.get("prefix", "") + text + info.get("suffix", "")
