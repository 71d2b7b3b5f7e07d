"""The multi-turn guessing game (rlhf_bench.leaderboard.guessing): the game by hand, its demonstrations as
the environment tokenises them, and a tiny benchmark run whose leaderboard reports turns and success."""

import json

import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

import llm_env
from llm_env.multiturn import Conversation, Reply, Transcript, Turn
from llm_env.tiny import word_tokenizer
from rlhf_bench.leaderboard import BenchmarkSettings, GuessingTask, run_benchmark
from rlhf_bench.leaderboard.guessing import demonstration_tokens


def conversation(task, prompt, guesses):
    turns = []
    for g in guesses:
        turns.append(Turn("assistant", g, ()))
    return Conversation(prompt, 0, turns)


def test_the_game_by_hand():
    task = GuessingTask(seed=0)
    prompt = task.prompts(1, stream=9)[0]
    secret = task.secret(prompt)
    assert prompt.startswith("game ") and prompt.endswith(": 1 to 16 :")
    assert task.prompts(3, stream=9) == task.prompts(3, stream=9) != task.prompts(3, stream=8)
    low = secret - 1 if secret > 1 else None
    if low is not None:
        reply = task.respond(conversation(task, prompt, [str(low)]))
        assert reply == Reply(f" higher : {secret} to 16 :")
    assert task.respond(conversation(task, prompt, ["w1 2"])) == Reply(" invalid : 1 to 16 :")
    assert task.respond(conversation(task, prompt, [str(secret)])) is None
    # Score: 1 at the first turn, 0.1 less per turn after it, 0 for a lost game.
    wrong = str(secret % 16 + 1)
    for guesses, expected in [([str(secret)], 1.0), ([wrong, str(secret)], 0.9), ([wrong] * 4, 0.0)]:
        transcript = Transcript(" ".join(guesses), conversation(task, prompt, guesses))
        assert task.score([prompt], [transcript]) == [pytest.approx(expected)]
    assert task.success_score == pytest.approx(0.7)
    with pytest.raises(TypeError, match="Transcript"):
        task.score([prompt], [str(secret)])
    with pytest.raises(ValueError, match="not a guessing-game prompt"):
        task.secret("sort a b :")


def test_bisection_wins_and_the_expert_errs():
    task = GuessingTask(seed=1)
    prompts = task.prompts(400, stream=3)
    perfect = GuessingTask(seed=1, mistake=0.0).demonstrations(prompts, stream=3)
    won = [
        task.game_score(p, [g for g, _ in game]) >= task.success_score for p, game in zip(prompts, perfect)
    ]
    assert 0.9 < np.mean(won) < 0.98  # 15 of 16 numbers within 4 bisection steps
    expert = task.demonstrations(prompts, stream=3)
    won = [task.game_score(p, [g for g, _ in game]) >= task.success_score for p, game in zip(prompts, expert)]
    assert 0.4 < np.mean(won) < 0.6  # half its guesses step linearly


def test_demonstrations_are_tokenised_as_the_environment_plays_them():
    """Replaying the expert's guesses in the multi-turn environment gives exactly the demonstration's tokens,
    the replies at the positions the agent mask leaves out."""
    task = GuessingTask(seed=2)
    tok = word_tokenizer([" ".join(task.vocabulary())])
    prompts = task.prompts(6, stream=4)
    games = task.demonstrations(prompts, stream=4)
    env = llm_env.TextGenVectorEnv(
        num_envs=1,
        prompts=prompts,
        tokenizer=tok,
        reward=task.score,
        max_new_tokens=32,
        autoreset_mode=AutoresetMode.DISABLED,
        device="cpu",
        **task.env_options(),
    )
    for i, (prompt, game) in enumerate(zip(prompts, games)):
        prompt_ids, ids, mask = demonstration_tokens(tok, prompt, game)
        obs, _ = env.reset(options={"prompt_indices": np.array([i])})
        actions = [t for t, m in zip(ids, mask) if m]
        for token in actions:
            obs, _, term, trunc, info = env.step(torch.tensor([token]))
        assert bool(term[0] | trunc[0])
        length = int(obs["attention_mask"][0].sum())
        assert obs["input_ids"][0, :length].tolist() == prompt_ids + ids
        assert obs["agent_mask"][0, len(prompt_ids) : length].bool().tolist() == mask
        score = task.game_score(prompt, [g for g, _ in game])
        assert info["completion"]["score"][0] == pytest.approx(score)


def test_a_tiny_benchmark_run_reports_turns_and_success(tmp_path):
    settings = BenchmarkSettings.tiny(max_new_tokens=32)
    result = run_benchmark(
        settings,
        task="guess-number",
        agents=["grpo", "dpo"],
        device="cpu",
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        log=lambda message: None,
    )
    rows = {row.agent: row.as_dict() for row in result.rows}
    assert set(rows) == {"sft", "grpo"}  # dpo is skipped: the task says why
    for row in rows.values():
        assert 1 <= row["turns"] <= 4 and row["response_length"] >= 2 * row["turns"] - 1
        assert row["pass_at_1"] is not None and row["gold_vs_sft"] is not None
    assert rows["sft"]["gold_vs_sft"] == 0.0
    table = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "turns" in table and "agent tokens" in table and "gold - SFT" in table
    saved = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert "at least 0.7" in saved["pass_at_k"]["correct"]
