"""Turn-level environments as token-level multi-turn tasks (llm_env.adapters): GEM and TextArena.

A scripted agent types a move token by token and ends its turn with EOS; each check compares what the
environment did with what the library's own game does with the same moves: the game's observation is the
reply in the next observation, its reward is paid on the turn's last token, its end ends the episode, and
invalid moves are answered as the game answers them. The base class's bookkeeping (retried turns, replays,
error names, random state) is checked on a game defined here, without the optional libraries."""

from __future__ import annotations

import pickle
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import llm_env
from llm_env.adapters import STATE_KEY, GameStep, GemTask, TextArenaTask, TurnLevelTask
from llm_env.multiturn import Conversation, Reply, Turn
from llm_env.tiny import char_tokenizer, tiny_gpt2

EOS = 1


@dataclass(frozen=True)
class Game:
    """One offline game of each library, and how to write a guess in it."""

    module: str
    task: type[TurnLevelTask]
    env_id: str
    guess: str  # format of a guess
    low: int
    high: int

    def make(self, **kwargs: Any) -> TurnLevelTask:
        pytest.importorskip(self.module)
        return self.task(self.env_id, **kwargs)

    def move(self, number: int) -> str:
        return self.guess.format(number)


GAMES = {
    "gem": Game("gem", GemTask, "game:GuessTheNumber-v0-easy", "\\boxed{{{}}}", 1, 10),
    "textarena": Game("textarena", TextArenaTask, "GuessTheNumber-v0", "[{}]", 1, 20),
}


@pytest.fixture(params=sorted(GAMES))
def game(request):
    return GAMES[request.param]


_MODELS: dict[str, Any] = {}


def tiny(task: TurnLevelTask):
    """A char tokenizer (every character of the game's text is a token) and a tiny GPT-2 over it."""
    key = task.library
    if key not in _MODELS:
        tok = char_tokenizer(task.prompts)
        _MODELS[key] = tok, tiny_gpt2(tok, n_positions=1024, seed=0)
    return _MODELS[key]


def make_env(task: TurnLevelTask, num_envs: int = 1, **kwargs):
    tok, model = tiny(task)
    options = dict(
        tokenizer=tok,
        reference=model,
        kl_coef=0.0,  # rewards are the game's alone, to compare exactly
        max_new_tokens=400,
        prompt_order="sequential",
        device="cpu",
    )
    options.update(kwargs)
    return llm_env.TextGenVectorEnv(num_envs=num_envs, **options, **task.env_kwargs())


def play(env, text: str):
    """Type ``text`` then EOS in sub-env 0; the last step's (obs, reward, terminated, truncated, info) and the
    rewards of the steps before it."""
    ids = env.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert env.tokenizer.decode(ids) == text
    before = []
    for token in ids:
        obs, reward, terminated, truncated, info = env.step(torch.tensor([token]))
        assert not (terminated[0] or truncated[0])
        before.append(float(reward[0]))
    return (*env.step(torch.tensor([EOS])), before)


def context(obs) -> list[int]:
    length = int(obs["attention_mask"][0].sum())
    return obs["input_ids"][0, :length].tolist()


def check_moves(task: TurnLevelTask, moves: list[str]) -> list[GameStep]:
    """Play ``moves`` in prompt 0's episode and check each against the library's own game."""
    env = make_env(task)
    obs, _ = env.reset(seed=0)
    assert env.tokenizer.decode(context(obs)) == task.prompts[0]
    reference = task.start(0)  # the same game, played directly
    steps = []
    for i, move in enumerate(moves):
        expected = task.step_game(reference.game, move)
        steps.append(expected)
        obs, reward, terminated, truncated, info, before = play(env, move)
        assert before == [0.0] * len(before)  # inside a turn: no reward (kl_coef=0)
        # The game's reward, paid on the turn's last token.
        assert float(reward[0]) == pytest.approx(expected.reward)
        if expected.done:  # the game's end is the episode's end
            assert terminated[0] and not truncated[0] and "_reply" not in info
            assert info["completion"]["turns"][0] == i + 1
            episode = info["completion"]["conversation"][0].state[STATE_KEY]
            assert episode.moves == moves[: i + 1] and episode.final_observation == expected.observation
            assert info["completion"]["return"][0] == pytest.approx(episode.total_reward)
            return steps
        assert not (terminated[0] or truncated[0])
        reply = task.reply_text(expected.observation)
        assert info["reply"][0] == reply
        ids = list(info["injected_ids"][0])
        assert ids == env.tokenizer(reply, add_special_tokens=False)["input_ids"]
        assert context(obs)[-len(ids) - 1 :] == [EOS, *ids]  # the reply follows the agent's stop token
        assert env.tokenizer.decode(context(obs)[-len(ids) :]) == reply
        assert obs["agent_mask"][0, len(context(obs)) - len(ids) :].sum() == 0
    return steps


def test_a_game_is_played_turn_by_turn_and_won(game):
    task = game.make(num_prompts=2)
    secret = task.start(0).game.game_number
    wrong = secret + 1 if secret < game.high else secret - 1
    steps = check_moves(task, [game.move(wrong), game.move(secret)])
    hint = "lower" if wrong > secret else "higher"
    assert hint in steps[0].observation and not steps[0].done
    assert steps[1].done and steps[1].reward == 1.0


def test_invalid_moves_are_answered_as_the_game_answers_them(game):
    task = game.make(num_prompts=1)
    secret = task.start(0).game.game_number
    valid = game.low if secret != game.low else game.high
    outside = game.move(game.high + 5)
    if game.module == "gem":
        # GEM: a number outside the range is answered and the game goes on; a move with no \boxed{} ends it.
        steps = check_moves(task, [game.move(valid), outside, "no idea"])
        assert "outside the range" in steps[1].observation and steps[1].reward == 0.0
        assert steps[2].done and steps[2].reward == -0.1
    else:
        # TextArena: one invalid move is answered with a warning; the second in a row ends the game, paying
        # how close the last valid guess was.
        steps = check_moves(task, [game.move(valid), outside, outside])
        assert "invalid move" in steps[1].observation and not steps[1].done
        assert steps[2].done
        assert steps[2].reward == pytest.approx(1 - abs(valid - secret) / (game.high - game.low))


def test_same_seed_same_games(game):
    state = random.getstate(), np.random.get_state()[1].copy()  # noqa: NPY002 - what the games draw from
    a, b = game.make(num_prompts=6, seed=3), game.make(num_prompts=6, seed=3)
    assert random.getstate() == state[0]  # the caller's global random states are left untouched
    assert (np.random.get_state()[1] == state[1]).all()  # noqa: NPY002
    assert a.prompts == b.prompts
    numbers = [a.start(i).game.game_number for i in range(6)]
    assert numbers == [b.start(i).game.game_number for i in range(6)]
    assert numbers[1:] == [game.make(num_prompts=5, seed=4).start(i).game.game_number for i in range(5)]
    assert len(set(numbers)) > 1  # seeds make different games

    def rollout():
        env = make_env(a, num_envs=2, prompt_order="shuffle", max_new_tokens=200)
        env.reset(seed=11)
        return torch.stack([step[0] for step in random_moves(env, game, seed=0, steps=80)])

    assert torch.equal(rollout(), rollout())


def random_moves(env, game: Game, seed: int, steps: int):
    """Every sub-env types random moves (a random guess, in or out of the range, or random characters)
    token by token, each ended by EOS; yields each step's (reward, terminated, truncated, info)."""
    rng = np.random.default_rng(seed)

    def encode(text: str) -> list[int]:
        return env.tokenizer(text, add_special_tokens=False)["input_ids"]

    noise = encode(game.move(1234567890) + " abc")
    queues: list[list[int]] = [[] for _ in range(env.num_envs)]
    for _ in range(steps):
        for queue in queues:
            if not queue:
                move = game.move(int(rng.integers(game.low - 2, game.high + 3)))
                queue += encode(move) if rng.random() < 0.8 else list(rng.choice(noise, 6))
                queue.append(EOS)
        _, reward, terminated, truncated, info = env.step(torch.tensor([queue.pop(0) for queue in queues]))
        for row in np.flatnonzero((terminated | truncated).numpy()):
            queues[row][:] = [EOS]  # the next step restarts this sub-env: its action is ignored
        yield reward, terminated, truncated, info


def test_random_rollout_over_several_episodes_with_autoreset(game):
    """Three sub-envs playing random moves; episodes restart as they end (NEXT_STEP autoreset)."""
    task = game.make(num_prompts=4)
    env = make_env(task, num_envs=3, prompt_order="shuffle", max_new_tokens=300)
    env.reset(seed=0)
    finished, game_over, replies = 0, 0, 0
    for _, _, _, info in random_moves(env, game, seed=1, steps=250):
        replies += int(info.get("_reply", np.zeros(3)).sum())
        if "_completion" not in info:
            continue
        for row in np.flatnonzero(info["_completion"]):
            finished += 1
            episode = info["completion"]["conversation"][row].state.get(STATE_KEY)
            if episode is not None:  # the agent ended at least one turn
                # The episode's return is the game's rewards (the final score is 0, no KL here).
                assert info["completion"]["return"][row] == pytest.approx(episode.total_reward)
                unanswered = 0 if info["completion"]["eos"][row] else 1  # a turn cut by max_new_tokens
                assert info["completion"]["turns"][row] == len(episode.moves) + unanswered
                game_over += episode.done
    assert finished >= 6 and game_over >= 3 and replies >= 10


# ---------------------------------------------------------------------- the base class, no library needed
class CountGame:
    """Say numbers; the game ends at the secret (drawn from the global ``random``, as GEM's games do)."""

    def __init__(self) -> None:
        self.secret = random.randint(1, 9)
        self.steps = 0


class CountTask(TurnLevelTask):
    library = "Test"

    def make_game(self) -> CountGame:
        return CountGame()

    def reset_game(self, game: CountGame, seed: int) -> str:
        random.seed(seed)  # like GEM: reset re-seeds the global random
        game.secret = random.randint(1, 9)
        return f"Guess a number from 1 to 9 (game {seed})."

    def step_game(self, game: CountGame, action: str) -> GameStep:
        game.steps += 1
        if action == "boom":
            raise ValueError("the game crashed")
        number = int(re.findall(r"\d", action)[-1]) if re.search(r"\d", action) else 0
        noise = random.random()  # a draw at every step, from the game's own stream
        if number == game.secret:
            return GameStep("You win.", 1.0, True)
        return GameStep(f"Not {number} ({noise:.3f}).", -0.1, False)


def conversation(task: TurnLevelTask, index: int, moves: list[str]) -> Conversation:
    turns = [Turn("assistant", move, ()) for move in moves]
    return Conversation(task.prompts[index], index, turns=turns)


def test_a_retried_turn_gets_the_same_reply_and_a_changed_one_is_replayed():
    task = CountTask("count", num_prompts=3, seed=7)
    secret = task.start(0).game.secret
    wrong = [str(n) for n in range(1, 10) if n != secret]
    c = conversation(task, 0, [wrong[0]])
    first = task.responder(c)
    episode = c.state[STATE_KEY]
    assert task.responder(c) == first and episode.game.steps == 1  # asked again: not played twice
    c.turns[-1] = Turn("assistant", wrong[1], ())  # the step retried with another move
    second = task.responder(c)
    replayed = c.state[STATE_KEY]
    assert replayed is not episode and replayed.moves == [wrong[1]] and replayed.game.steps == 1
    assert second.text.startswith(f"\nNot {wrong[1]} (") and second.reward == -0.1
    c.turns.append(Turn("assistant", str(secret), ()))
    assert task.responder(c) == Reply(None, reward=1.0)  # the game's end ends the episode
    assert replayed.done and replayed.final_observation == "You win." and replayed.game is None
    assert replayed.rewards == [-0.1, 1.0] and replayed.total_reward == pytest.approx(0.9)
    with pytest.raises(RuntimeError, match=r"'count' \(prompt 0, seed 7\) is over"):
        c.turns.append(Turn("assistant", "1", ()))
        task.responder(c)


def test_the_games_random_stream_is_its_own_and_survives_pickling():
    task = CountTask("count", num_prompts=2)
    secret = task.start(1).game.secret
    moves = [str(n) for n in range(1, 10) if n != secret][:3]
    alone = conversation(task, 1, [])
    replies = []
    for move in moves:
        alone.turns.append(Turn("assistant", move, ()))
        replies.append(task.responder(alone))
    # Interleaved with another episode and with draws from the global random: the same replies.
    interleaved, other = conversation(task, 1, []), conversation(task, 0, [])
    for i, move in enumerate(moves):
        random.random()
        other.turns.append(Turn("assistant", move, ()))
        task.responder(other)
        interleaved.turns.append(Turn("assistant", move, ()))
        assert task.responder(interleaved) == replies[i]
    # A pickled conversation keeps the record, drops the live game, and is replayed when played on.
    copy = pickle.loads(pickle.dumps(interleaved))
    assert copy.state[STATE_KEY].game is None and copy.state[STATE_KEY].moves == moves
    assert task.responder(copy) == replies[-1]
    copy.turns.append(Turn("assistant", str(secret), ()))
    assert task.responder(copy) == Reply(None, reward=1.0)


def test_a_game_that_raises_is_named_and_the_environment_stays_usable():
    task = CountTask("count", num_prompts=1, seed=2)
    tok = char_tokenizer(task.prompts)
    env = llm_env.TextGenEnv(tokenizer=tok, max_new_tokens=60, device="cpu", **task.env_kwargs())
    env.reset(seed=0)
    for token in tok("boom", add_special_tokens=False)["input_ids"]:
        env.step(token)
    with pytest.raises(
        RuntimeError, match=r"Test game 'count' \(prompt 0, seed 2\) raised at move 1 \('boom'\)"
    ):
        env.step(EOS)
    digit = next(str(n) for n in range(1, 10) if n != task.start(0).game.secret)
    env.step(tok.convert_tokens_to_ids(digit))  # the env is as it was: the turn goes on
    obs, reward, terminated, truncated, info = env.step(EOS)
    assert not terminated and reward == pytest.approx(-0.1)
    assert info["reply"] == task.reply_text(info["reply"].strip()) and f"Not {digit}" in info["reply"]


def test_env_kwargs_and_chat_layout():
    text = CountTask("count", num_prompts=2)
    assert text.prompts[0] == "Guess a number from 1 to 9 (game 0).\n"
    assert text.reply_text("Not 3.") == "\nNot 3.\n"
    chat = CountTask("count", num_prompts=2, chat=True, max_turns=4)
    assert chat.prompts[0] == "Guess a number from 1 to 9 (game 0)." and chat.reply_text("Not 3.") == "Not 3."
    kwargs = chat.env_kwargs()
    assert kwargs["chat_template"] is True and kwargs["max_turns"] == 4 and kwargs["prompts"] == chat.prompts
    assert kwargs["reward"](["a", "b"], ["c", "d"]) == [0.0, 0.0]
    llm_env.EnvConfig(tokenizer=char_tokenizer([]), **kwargs)  # valid options
    for bad in ({"num_prompts": 0}, {"seed": -1}):
        with pytest.raises(ValueError):
            CountTask("count", **bad)
