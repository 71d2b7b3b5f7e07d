"""TextArena's single-player games as token-level multi-turn tasks.

TextArena (Guertler et al. 2025, https://github.com/LeonGuertler/TextArena, ``pip install textarena``) is a
collection of 100+ text games for LLMs. A game is driven with ``reset(num_players, seed)``,
``get_observation() -> (player_id, messages)``, ``step(action) -> (done, info)`` and, once done,
``close() -> (rewards, game_info)``: the rewards come at the end of the game, one per player.

:class:`TextArenaTask` plays a single-player game (``GuessTheNumber-v0``, ``Mastermind-v0``,
``TowerOfHanoi-v0``, ...; games of several players need opponents and are refused by TextArena's own
``SinglePlayerState`` check) under a token-level agent (see :class:`llm_env.adapters.TurnLevelTask` for the
mapping): the game's messages after ``reset`` are the prompt, the messages each move brings are the reply,
and the episode ends when the game does, paying player 0's reward from ``close()`` on the last turn (moves
before it pay 0). An invalid move is the game's business: TextArena answers the first with a message
asking for a valid move, and ends the game at the next one in a row (``error_allowance``).

Messages: ``ta.make`` wraps a game in observation wrappers that render the whole history at every turn
(``LLMObservationWrapper``) and action wrappers (``ActionFormattingWrapper`` adds the ``[...]`` a move lacks).
The token-level context already holds the history, so the adapter reads the new messages from the game
itself, without the observation wrappers, and writes them as ``LLMObservationWrapper`` does, one a line:
``[GAME] The target number is higher.``; the agent's own move, which the game echoes, is left out. Moves
go through the action wrappers, as TextArena plays them (ids ending in ``-raw`` have none).

Version: written against textarena 0.7.4, whose games draw from Python's global ``random`` (a state of the
game's own here, see :mod:`llm_env.adapters.base`). Its word games load NLTK corpora, which need a
download; GuessTheNumber, Mastermind, TowerOfHanoi and the like run offline.
"""

from __future__ import annotations

from typing import Any

from llm_env.adapters.base import GameStep, TurnLevelTask

__all__ = ["TextArenaTask"]

PLAYER = 0
"""The agent's player id in a single-player game."""


def _textarena() -> Any:
    try:
        import textarena
    except ImportError as error:
        raise ImportError(
            'TextArenaTask needs TextArena: pip install -e ".[textarena]" (or pip install "textarena>=0.7.4,<0.8")'
        ) from error
    return textarena


class TextArenaTask(TurnLevelTask):
    """A single-player TextArena game (``ta.make(env_id, **make_kwargs)``) as a token-level multi-turn task.

    Usage::

        task = TextArenaTask("GuessTheNumber-v0", num_prompts=64, seed=0)
        envs = llm_env.TextGenVectorEnv(num_envs=8, tokenizer=tok, reference=sft, **task.env_kwargs())

    The game's reward is paid when it ends (``close()``'s reward of player 0: 1 for a win in GuessTheNumber,
    else how close the last guess was); an episode cut by ``max_new_tokens`` or ``max_turns`` before the game
    ends pays none. ``conversation.state[STATE_KEY].final_observation`` holds the game's closing messages
    and its ``game_info`` reason.
    """

    library = "TextArena"

    def import_library(self) -> None:
        _textarena()

    def make_game(self) -> Any:
        return _textarena().make(self.env_id, **self.make_kwargs)

    def reset_game(self, game: Any, seed: int) -> str:
        try:
            game.reset(num_players=1, seed=seed)
        except AssertionError as error:  # SinglePlayerState's and the others' player-count checks
            raise ValueError(f"TextArenaTask plays single-player games only: {error}") from error
        return self._messages(game)

    def step_game(self, game: Any, action: str) -> GameStep:
        done, _ = game.step(action)
        text = self._messages(game)
        if not done:
            return GameStep(text, 0.0, False)
        rewards, game_info = game.close()
        reason = (game_info or {}).get(PLAYER, {}).get("reason")
        if reason:
            text = f"{text}\n[GAME] {reason}" if text else f"[GAME] {reason}"
        return GameStep(text, float((rewards or {}).get(PLAYER, 0.0)), True)

    def _messages(self, game: Any) -> str:
        """The messages the game has for the agent since its last move, one ``[sender] message`` a line."""
        ta = _textarena()
        base = game
        while isinstance(base, ta.Wrapper):  # below the observation wrappers: the new messages only
            base = base.env
        player, messages = base.get_observation()
        if player != PLAYER:
            raise RuntimeError(f"expected player {PLAYER} to move, the game asks player {player}")
        lines = []
        for sender, message, kind in messages:
            if sender == PLAYER and kind == ta.ObservationType.PLAYER_ACTION:
                continue  # the agent's own move, already in the context
            name = "GAME" if sender == ta.GAME_ID else base.state.role_mapping.get(sender, f"Player {sender}")
            lines.append(f"[{name}] {message}")
        return "\n".join(lines)
