"""The built-in multi-turn task: guess a hidden number, told after each guess whether it is higher or lower.

A game is one episode of several turns (:mod:`llm_env.multiturn`). The prompt names the game and the range,
``game c a h d : 1 to 16 :``; the hidden number is a seeded function of the game's name, so every sample of
the same prompt (a GRPO group, say) plays the same game, and the policy cannot read it. The agent answers
with one number and ends its turn (`` 8`` then the end-of-sequence token); the responder answers a wrong
guess with the direction and the numbers still possible, `` higher : 9 to 16 :``, and ends the episode on
the right one. A guess that is not one number of the range gets `` invalid : ...`` and costs its turn.
After ``max_turns`` turns the game is lost.

Score (the checker, both the reward the agents optimise and the gold): ``1 - turn_cost * (t - 1)`` for a
game won at turn ``t``, 0 for a lost one, so winning is most of the reward and winning in fewer turns the
rest (1, 0.9, 0.8, 0.7 by default); a game counts as *solved* when it is won (score >= ``1 - turn_cost *
(max_turns - 1)``: the leaderboard's success rate, pass@1).
Bisection (guess the middle of what is still possible) wins every game of 1-16 in at most 5 turns and 15
of 16 in 4 (the default ``max_turns``).

The SFT policy imitates a scripted, imperfect expert: each of its guesses is the middle of the numbers still
possible (bisection), or, a ``mistake`` share of the time, the lowest of them (a step of linear search). Its demonstrations are whole games
(prompt, the expert's guesses, the responder's replies), learnt on the expert's tokens only (the replies
are context: :meth:`agents.policy.SequenceBatch.build` with agent masks), after pretraining on whole games.
RL has room: the policy can learn to bisect.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.sft import sft_train
from llm_env.models import load_tokenizer
from llm_env.multiturn import Conversation, Reply, Transcript
from llm_env.tiny import word_tokenizer
from rlhf_bench.leaderboard.artifacts import Artifacts, cached_build, new_sft_policy, sample_texts
from rlhf_bench.leaderboard.settings import BenchmarkSettings
from rlhf_bench.leaderboard.tasks import register_task
from rlhf_bench.leaderboard.verifiable import Log

__all__ = ["GUESSING_VERSION", "GuessingTask", "build_guessing_artifacts", "guessing_settings"]

GUESSING_VERSION = 3
"""Bumped whenever the game, the expert or the way artifacts are built changes, so cached artifacts are
rebuilt."""

LETTERS = tuple("abcdefghij")


@dataclass(frozen=True)
class GuessingTask:
    """The guessing game: prompts, the responder (the game), the scripted expert and the checker.

    Args:
        seed: seeds the games' names, hidden numbers and the expert's choices.
        high: the numbers are 1 to ``high``.
        max_turns: guesses allowed per game.
        mistake: share of the expert's guesses that take the lowest number still possible instead of the
            middle one.
        name_letters: letters of a game's name (10 ** name_letters games).
        turn_cost: what each turn after the first takes off a won game's score.
    """

    seed: int = 0
    high: int = 16
    max_turns: int = 4
    mistake: float = 0.5
    name_letters: int = 4
    turn_cost: float = 0.1

    def __post_init__(self) -> None:
        if self.high < 2 or self.max_turns < 1 or not 0.0 <= self.mistake <= 1.0 or self.name_letters < 1:
            raise ValueError(
                f"need high >= 2, max_turns >= 1, mistake in [0, 1] and name_letters >= 1, got {self.high}, "
                f"{self.max_turns}, {self.mistake} and {self.name_letters}"
            )
        if not 0.0 <= self.turn_cost * (self.max_turns - 1) < 1.0:
            raise ValueError(
                f"turn_cost * (max_turns - 1) must be in [0, 1) so that every won game scores above a lost one, "
                f"got {self.turn_cost} * {self.max_turns - 1}"
            )

    # ------------------------------------------------------------------------------------- the game
    def vocabulary(self) -> list[str]:
        """Every word of prompts, guesses and replies."""
        numbers = [str(i) for i in range(1, self.high + 1)]
        return [*numbers, *LETTERS, "game", "to", ":", "higher", "lower", "invalid"]

    def prompts(self, n: int, *, stream: int) -> list[str]:
        """``n`` games from an independent stream: ``game c a h d : 1 to 16 :``."""
        rng = np.random.default_rng((self.seed, stream))
        names = rng.integers(0, len(LETTERS), size=(n, self.name_letters))
        return [f"game {' '.join(LETTERS[i] for i in name)} : 1 to {self.high} :" for name in names]

    def secret(self, prompt: str) -> int:
        """The hidden number of the game a prompt names (a seeded function of its name)."""
        words = str(prompt).split()
        try:
            name = words[1 : words.index(":")]
            if words[0] != "game" or len(name) != self.name_letters:
                raise ValueError
            code = int("".join(str(LETTERS.index(letter)) for letter in name))
        except ValueError:
            raise ValueError(f"not a guessing-game prompt ('game c a h d : 1 to 16 :'): {prompt!r}") from None
        return int(np.random.default_rng((self.seed, 7, code)).integers(1, self.high + 1))

    def guess(self, text: str) -> int | None:
        """The number a turn's text guesses, or None when it is not one number of the range."""
        words = text.split()
        if len(words) == 1 and words[0].isdigit() and 1 <= int(words[0]) <= self.high:
            return int(words[0])
        return None

    def play(self, prompt: str, turns: Sequence[str]) -> tuple[int | None, int, int]:
        """Replay the agent's turns: (the turn that won, 1-based, or None; the lowest and the highest number
        still possible after them)."""
        secret, low, high = self.secret(prompt), 1, self.high
        for t, text in enumerate(turns, start=1):
            guess = self.guess(text)
            if guess == secret:
                return t, low, high
            if guess is not None:
                low, high = (max(low, guess + 1), high) if guess < secret else (low, min(high, guess - 1))
        return None, low, high

    def respond(self, conversation: Conversation) -> Reply | None:
        """The responder: ends the game on the right guess, else tells the direction and the numbers still
        possible. Stateless: the game is replayed from the conversation."""
        turns = conversation.agent_turns
        won, low, high = self.play(conversation.prompt, turns)
        if won is not None:
            return None
        guess = self.guess(turns[-1])
        word = (
            "invalid"
            if guess is None
            else ("higher" if guess < self.secret(conversation.prompt) else "lower")
        )
        return Reply(f" {word} : {low} to {high} :")

    def score(self, prompts: Sequence[str], responses: Sequence[Any]) -> list[float]:
        """The checker: ``1 - turn_cost * (t - 1)`` for a game won at turn t, else 0. Responses must be
        the environment's :class:`~llm_env.multiturn.Transcript` s (they carry the turns)."""
        scores = []
        for prompt, response in zip(prompts, responses, strict=True):
            if not isinstance(response, Transcript):
                raise TypeError(
                    "the guessing game scores whole conversations: pass the environment's Transcript "
                    f"responses (with .conversation), got {type(response).__name__}"
                )
            scores.append(self.game_score(prompt, response.conversation.agent_turns))
        return scores

    def game_score(self, prompt: str, turns: Sequence[str]) -> float:
        """The score of a game whose agent turns are ``turns``."""
        won, _, _ = self.play(prompt, turns)
        return 0.0 if won is None or won > self.max_turns else 1.0 - self.turn_cost * (won - 1)

    @property
    def success_score(self) -> float:
        """The lowest score of a won game: a response scoring at least this solved its game."""
        return 1.0 - self.turn_cost * (self.max_turns - 1)

    def env_options(self) -> dict[str, Any]:
        """The environment options that make an episode a game."""
        return {"responder": self.respond, "max_turns": self.max_turns}

    # ----------------------------------------------------------------------------------- the expert
    def demonstrations(self, prompts: Sequence[str], *, stream: int) -> list[list[tuple[str, str]]]:
        """One game of the scripted expert per prompt: the list of (guess, reply) turns, the reply ``""`` after
        the last turn (won, or out of turns)."""
        rng = np.random.default_rng((self.seed, stream, 1))
        games = []
        for prompt in prompts:
            secret, low, high, turns = self.secret(prompt), 1, self.high, []
            for _ in range(self.max_turns):
                guess = (low + high) // 2 if rng.random() >= self.mistake else low
                if guess == secret:
                    turns.append((f" {guess}", ""))
                    break
                low, high = (guess + 1, high) if guess < secret else (low, guess - 1)
                word = "higher" if guess < secret else "lower"
                turns.append((f" {guess}", f" {word} : {low} to {high} :"))
            if turns[-1][1]:
                turns[-1] = (turns[-1][0], "")  # out of turns: no reply follows the last guess
            games.append(turns)
        return games


def demonstration_tokens(
    tokenizer: Any, prompt: str, game: list[tuple[str, str]]
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, conversation ids, agent mask) of a demonstrated game, tokenised as the environment does:
    each guess followed by the end-of-sequence token that ends the turn, each reply on its own."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    mask: list[bool] = []
    for guess, reply in game:
        own = [*tokenizer(guess, add_special_tokens=False)["input_ids"], eos]
        other = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
        ids += own + other
        mask += [True] * len(own) + [False] * len(other)
    return tokenizer(prompt)["input_ids"], ids, mask


def guessing_settings(settings: BenchmarkSettings) -> BenchmarkSettings:
    """The guessing game's own settings: the verifiable tasks' update shape (one on-policy step per rollout,
    :func:`~rlhf_bench.leaderboard.verifiable.rlvr_settings`' reasons), three times the learning rate, and
    eight times the training prompts (games)."""
    return dataclasses.replace(
        settings,
        update_epochs=1,
        minibatches=1,
        ppo_lr=round(3 * settings.ppo_lr, 12),
        token_budget=3 * settings.token_budget,
        train_prompts=8 * settings.train_prompts,
    )


def play_games(
    policy: torch.nn.Module,
    tokenizer: Any,
    task: GuessingTask,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    num_envs: int,
    device: torch.device | str,
    seed: int,
) -> np.ndarray:
    """The checker's scores of one game per prompt played by ``policy`` (sampled at temperature 1)."""
    games = sample_texts(
        policy,
        tokenizer,
        prompts,
        1,
        max_new_tokens=max_new_tokens,
        num_envs=num_envs,
        device=device,
        seed=seed,
        env_options=task.env_options(),
    )
    return np.asarray(task.score(prompts, [transcripts[0] for transcripts in games]))


def build_guessing_artifacts(
    task: GuessingTask,
    settings: BenchmarkSettings,
    *,
    directory: Path,
    device: torch.device | str = "cpu",
    rebuild: bool = False,
    log: Log = print,
    progress: bool = True,
) -> Artifacts:
    """The guessing game's artifacts: a word-level tokenizer, the SFT policy (pretrained on ``pretrain_texts``
    whole expert games, fine-tuned on the expert's turns of ``sft_pairs`` more), and its held-out score."""

    def build(tmp: Path) -> dict[str, Any]:
        tokenizer = word_tokenizer([" ".join(task.vocabulary())])
        model, config = new_sft_policy(tokenizer, settings, device=device, progress=progress)
        metrics: dict[str, Any] = {}
        for stage, n, stream, masked in (
            ("pretrained", settings.pretrain_texts, 1, False),
            ("fine-tuned", settings.sft_pairs, 2, True),
        ):
            start = time.perf_counter()
            prompts = task.prompts(n, stream=stream)
            examples = []
            for prompt, game in zip(prompts, task.demonstrations(prompts, stream=stream), strict=True):
                prompt_ids, ids, mask = demonstration_tokens(tokenizer, prompt, game)
                examples.append((prompt_ids, ids, mask if masked else None))
            model, result = sft_train(model, examples, config)
            key = "sft_loss" if masked else "pretrain_loss"
            metrics[key] = result["epoch_loss"][-1]
            what = "the expert's turns of" if masked else "whole games of"
            log(
                f"{stage} the policy on {what} {n} expert games: loss {metrics[key]:.3f} ({time.perf_counter() - start:.0f}s)"
            )
        model.eval()
        model.save_pretrained(tmp / "sft")
        tokenizer.save_pretrained(tmp / "sft")
        start = time.perf_counter()
        held_out = task.prompts(settings.rm_eval_prompts, stream=4)
        scores = play_games(
            model,
            tokenizer,
            task,
            held_out,
            max_new_tokens=settings.max_new_tokens,
            num_envs=settings.num_envs,
            device=device,
            seed=settings.seed * 1000 + 3,
        )
        games = task.demonstrations(held_out, stream=4)
        expert = np.asarray([task.game_score(p, [guess for guess, _ in g]) for p, g in zip(held_out, games)])
        metrics.update(
            sft_score=float(scores.mean()),
            sft_solved=float(np.mean(scores >= task.success_score)),
            expert_score=float(expert.mean()),
            expert_solved=float(np.mean(expert >= task.success_score)),
        )
        log(
            f"the SFT policy scores {metrics['sft_score']:.3f} on {len(held_out)} held-out games "
            f"({metrics['sft_solved']:.1%} won; the expert it imitates {metrics['expert_score']:.3f}, "
            f"{metrics['expert_solved']:.1%}) ({time.perf_counter() - start:.0f}s)"
        )
        return metrics

    metrics = cached_build(directory, build, settings=settings, rebuild=rebuild, log=log, what="SFT policy")
    return Artifacts(
        policy_path=str(directory / "sft"),
        reference_path=str(directory / "sft"),
        tokenizer=load_tokenizer(directory / "sft"),
        reward=task.score,
        gold=task.score,
        train_prompts=task.prompts(settings.train_prompts, stream=5),
        eval_prompts=task.prompts(settings.eval_prompts, stream=6),
        metrics=metrics,
        directory=directory,
        task=task,
        verifiable=True,
        env_options=task.env_options(),
        success_score=task.success_score,
        unsupported_agents={
            "dpo": "offline DPO trains on text preference pairs; a game's turns need their replies as context"
        },
    )


@register_task(
    "guess-number",
    settings=guessing_settings,
    description="multi-turn: guess a hidden number 1-16 in at most 4 turns, told 'higher'/'lower' and the "
    "numbers still possible after each guess; scored by winning in fewer turns (verifiable)",
    version=GUESSING_VERSION,
)
def guessing_task(settings: BenchmarkSettings, *, directory: Path, **options: Any) -> Artifacts:
    """The guessing game's artifacts (:func:`build_guessing_artifacts`)."""
    return build_guessing_artifacts(
        GuessingTask(seed=settings.seed), settings, directory=directory, **options
    )
