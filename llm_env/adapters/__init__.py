"""The ecosystem's turn-level environments as token-level multi-turn tasks.

Environment libraries for LLM agents step whole turns of text; this library steps one token
(:mod:`llm_env.multiturn`). An adapter turns such an environment into the ``prompts``, ``responder`` and
``reward`` of a multi-turn :class:`llm_env.TextGenVectorEnv`, so its games and tools run under token-level
agents whose tokens are never re-tokenised:

* :class:`GemTask`: GEM's environments (``pip install gem-llm``; ``gem.make(env_id)``);
* :class:`TextArenaTask`: TextArena's single-player games (``pip install textarena``; ``ta.make(env_id)``);
* :class:`TurnLevelTask`: the shared base; subclass it with ``make_game``, ``reset_game`` and ``step_game``
  for any other turn-level text environment.

::

    from llm_env.adapters import GemTask
    task = GemTask("game:GuessTheNumber-v0-easy", num_prompts=64, seed=0)
    envs = llm_env.TextGenVectorEnv(num_envs=8, tokenizer=tok, reference=sft, max_new_tokens=512,
                                    **task.env_kwargs())

The libraries are optional extras (``.[gem]``, ``.[textarena]``), imported when a task is built.
"""

from llm_env.adapters.base import STATE_KEY, GameEpisode, GameStep, TurnLevelTask
from llm_env.adapters.gem import GemTask
from llm_env.adapters.textarena import TextArenaTask

__all__ = ["STATE_KEY", "GameEpisode", "GameStep", "GemTask", "TextArenaTask", "TurnLevelTask"]
