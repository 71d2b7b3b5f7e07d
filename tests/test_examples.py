"""The teaching examples (PPO and GRPO written from scratch against the Gym API): their advantages by
hand, their teacher-forced log-probabilities against the ones they act with, and, end to end, that they
raise the proxy reward model's score on the benchmark's tiny review task and change nothing without a
gradient.

Each example evaluates before and after training on the same held-out prompts with the same sampling
seed, so an untrained policy scores exactly the same twice: any gain comes from learning. The multi-turn
example (guess-the-number with a responder) is checked the same way, plus its layout of replies and agent
tokens against the environment's.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode

from llm_env.tiny import tiny_gpt2, word_tokenizer
from rlhf_bench.leaderboard import BenchmarkSettings, build_artifacts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Few updates on toy sizes; the learning rate is raised for the 32-wide tiny policy. The proxy gains
# 0.6-1.0 (seeds 0 and 1); with the policy gradient's sign flipped it falls by 0.1-0.4, with lr = 0 by 0.
COMMON = ["--updates", "10", "--num-envs", "32", "--minibatch-size", "8", "--lr", "1e-3"]
COMMON += ["--eval-samples", "4"]  # 16 held-out prompts x 4 answers
ARGS = {"ppo_from_scratch": COMMON, "grpo_from_scratch": [*COMMON, "--group-size", "4"]}


def load_example(name: str):
    """Import ``examples/<name>.py`` (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROMPTS = ["the film was", "a great movie", "i liked the", "this book is", "the food was cold and"]
ppo, grpo = load_example("ppo_from_scratch"), load_example("grpo_from_scratch")


def test_gae_by_hand():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [1.0, 0.5, 9.0]])  # 9.0 lies past the end of answer 2
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # Answer 1: deltas 0.4, 0.1, 0.1 from the end; A_1 = 0.1 + 0.5 * 0.4, A_0 = 0.1 + 0.5 * 0.3.
    # Answer 2: V = 0 after its last token: delta_1 = 2 - 0.5, delta_0 = 0 + 0.5 - 1; A_0 = -0.5 + 0.5 * 1.5.
    torch.testing.assert_close(advantages, torch.tensor([[0.25, 0.3, 0.4], [0.25, 1.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.45, 0.7, 1.0], [1.25, 2.0, 0.0]]))


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 3.0, 0.5, 0.5])  # two prompts, G = 2
    advantages = grpo.group_advantages(scores, 2)
    # Group 1: mean 2, sample std sqrt(2); group 2: all equal, nothing to learn.
    expected = [-1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4), 0.0, 0.0]
    assert advantages.tolist() == pytest.approx(expected)


def test_teacher_forced_logprobs_are_the_ones_the_examples_act_with(saved_gpt2, reward_fn):
    """One pass over the final observations gives back, token by token, the log-probabilities sent to the
    environment while acting: the position arithmetic (state s_t ends at prompt_len + t - 1) is right."""
    envs = gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=4,
        prompts=PROMPTS,
        reference=str(saved_gpt2),
        reward=reward_fn,
        kl_coef=0.1,
        max_new_tokens=6,
        autoreset_mode=AutoresetMode.DISABLED,
    )
    agent = ppo.Agent(str(saved_gpt2)).eval()
    batch = ppo.rollout(agent.lm, envs, torch.Generator().manual_seed(0), seed=0, prompt_indices=[0, 1, 4, 4])
    assert batch["prompt"][2] == batch["prompt"][3] == PROMPTS[4]
    lengths = batch["mask"].sum(1) - batch["prompt_len"]
    assert batch["token_mask"].sum(1).tolist() == lengths.tolist() and lengths.min() >= 1
    with torch.no_grad():
        logp, values = ppo.logprobs_and_values(agent, batch)
        grpo_logp = grpo.response_logprobs(agent.lm, batch, batch["rewards"].shape[1])
    real = batch["token_mask"].bool()
    torch.testing.assert_close(logp[real], batch["logprobs"][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grpo_logp[real], batch["logprobs"][real], atol=1e-5, rtol=1e-5)
    assert torch.all(values == 0)  # the zero-initialised value head
    # The environment paid the KL inside the reward: each row's rewards sum to score - beta * KL.
    np.testing.assert_allclose(
        batch["rewards"].sum(1).numpy(), batch["score"] - 0.1 * batch["kl"], rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    """The benchmark's tiny SFT policy and proxy reward models, built once into a private cache."""
    path = tmp_path_factory.mktemp("llm_env_cache")
    build_artifacts(BenchmarkSettings.tiny(), cache_dir=path, progress=False, log=lambda _: None)
    return path


def run(name: str, cache: Path, *extra: str) -> dict:
    return load_example(name).main(["--tiny", "--cache-dir", str(cache), *ARGS[name], *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_raises_the_proxy_score(name, tiny_cache, capsys):
    result = run(name, tiny_cache)
    gain = result["after"]["proxy"] - result["before"]["proxy"]
    assert gain > 0.3, (
        f"{name}: proxy score {result['before']['proxy']:.3f} -> {result['after']['proxy']:.3f}"
    )
    assert result["after"]["kl"] > 0.1  # it moved away from the SFT model to get there
    assert len(result["history"]) == 10 and "gold" in result["after"]
    printed = capsys.readouterr().out
    assert "before training: proxy" in printed and "after training: proxy" in printed


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARGS))
def test_without_a_learning_rate_nothing_changes(name, tiny_cache):
    """The margin above cannot come from evaluation noise: with lr = 0 before and after are identical."""
    result = run(name, tiny_cache, "--updates", "1", "--lr", "0")
    assert result["after"] == result["before"]
    assert result["after"]["kl"] == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------------- multi-turn example
mt = load_example("multiturn_from_scratch")


def multiturn_env(lm, tok, num_envs: int):
    return gym.make_vec(
        "llm_env/TextGen-v0",
        num_envs=num_envs,
        prompts=[mt.PROMPT] * len(mt.NUMBERS),
        tokenizer=tok,
        reference=copy.deepcopy(lm),
        reward=mt.solved,
        kl_coef=0.02,
        responder=mt.guess_the_number,
        max_turns=mt.MAX_TURNS,
        max_new_tokens=4 * mt.MAX_TURNS,
        device="cpu",
        autoreset_mode=AutoresetMode.DISABLED,
    )


@pytest.fixture(scope="module")
def guessing_policy():
    tok = word_tokenizer([mt.PROMPT, " ".join(mt.NUMBERS), "higher lower"])
    return tok, tiny_gpt2(tok, n_embd=64, seed=0)


def test_scripted_games_are_laid_out_as_the_environment_lays_out_episodes(guessing_policy):
    """Played token by token through the environment, the scripted games give back their own input_ids and
    agent_mask: replies where the responder puts them, none after the last allowed turn."""
    tok, lm = guessing_policy
    secrets = np.array([1, 2, 3, 4, 5, 6, 7, 8, 8, 1, 4, 5])
    games = mt.scripted_games(tok, secrets, mt.MAX_TURNS, np.random.default_rng(0))
    envs = multiturn_env(lm, tok, len(secrets))
    obs, _ = envs.reset(options={"prompt_indices": secrets - 1})
    actions = [row[mask.bool()] for row, mask in zip(games["input_ids"], games["agent_mask"])]
    done = torch.zeros(len(secrets), dtype=torch.bool)
    step, replies = 0, set()
    while not done.all():
        tokens = torch.tensor([int(a[step]) if step < len(a) else 0 for a in actions])
        obs, _, terminated, truncated, info = envs.step(tokens)
        done |= terminated | truncated
        replies.update(info["reply"][info["_reply"]] if "reply" in info else ())
        step += 1
    width = games["input_ids"].shape[1]
    assert obs["attention_mask"][:, width:].sum() == 0
    torch.testing.assert_close(obs["attention_mask"][:, :width], games["attention_mask"])
    torch.testing.assert_close(obs["agent_mask"][:, :width], games["agent_mask"])
    real = games["attention_mask"].bool()
    assert torch.equal(obs["input_ids"][:, :width][real], games["input_ids"][real])
    assert replies == {"higher", "lower"}


def test_multiturn_teacher_forced_logprobs_are_the_ones_the_example_acts_with(guessing_policy):
    """One pass over the final observations, masked with agent_mask, gives back the log-probabilities sent
    while acting, token by token, although replies sit between the turns; the per-token rewards sum to each
    game's return; the mask counts exactly the agent's tokens of each conversation."""
    tok, lm = guessing_policy
    lm = copy.deepcopy(lm)
    games = mt.scripted_games(
        tok, np.random.default_rng(1).integers(1, 9, 512), mt.MAX_TURNS, np.random.default_rng(1)
    )
    mt.supervised_warm_start(lm, games, steps=30, seed=0)  # plays by the rules: turns and replies
    envs = multiturn_env(lm, tok, 16)
    batch = mt.rollout(lm, envs, torch.Generator().manual_seed(0), np.repeat(np.arange(8), 2))
    assert batch["turns"].max() >= 2
    with torch.no_grad():
        logp, agent = mt.agent_logprobs(lm, batch["episodes"])
    for row in range(16):
        mine = logp[row][agent[row].bool()]  # the agent's tokens, in order, replies skipped
        torch.testing.assert_close(mine, batch["logprobs"][row, : len(mine)], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batch["rewards"].sum(1).numpy(), batch["return"], rtol=1e-5, atol=1e-5)
    agent_tokens = [
        sum(len(t.token_ids) for t in c.turns if t.role == "assistant") for c in batch["conversation"]
    ]
    assert agent.sum(1).tolist() == agent_tokens


def test_multiturn_advantages_to_go_by_hand():
    # One group of two games: solved at the 2nd guess (4 agent tokens), fouled at the 1st (2 tokens).
    rewards = torch.tensor([[0.0, -0.1, 0.0, 1.0], [0.0, -1.0, 0.0, 0.0]])
    advantages = mt.advantages_to_go(rewards, torch.tensor([4, 2]), group_size=2)
    # Rewards to go: [0.9, 0.9, 1, 1] and [-1, -1, 0, 0]; each game's baseline is the other's while it plays.
    expected = torch.tensor([[0.9 + 1, 0.9 + 1, 1.0, 1.0], [-1 - 0.9, -1 - 0.9, 0.0, 0.0]])
    torch.testing.assert_close(advantages, expected)


def run_multiturn(*extra: str) -> dict:
    return mt.main(["--tiny", *extra])


@pytest.mark.slow
def test_multiturn_example_learns_to_use_the_feedback(capsys):
    # 150 updates of 64 games: success +0.15 to +0.20 (seeds 0-2), about 25 s on 2 cores; the default run
    # (300 updates) reaches binary search's 0.875.
    result = run_multiturn(
        "--updates", "150", "--num-envs", "64", "--sft-steps", "100", "--eval-rollouts", "2"
    )
    before, after = result["before"]["success"], result["after"]["success"]
    assert after > before + 0.1, f"success {before:.3f} -> {after:.3f}"
    assert result["after"]["kl"] > 0.1
    printed = capsys.readouterr().out
    assert "before RL" in printed and "after RL" in printed


@pytest.mark.slow
def test_multiturn_without_a_learning_rate_nothing_changes():
    result = run_multiturn("--lr", "0")
    assert result["after"] == result["before"]


# ----------------------------------------------- the examples the tutorials walk through (docs/tutorials)
def run_script(name: str, monkeypatch, *argv: str):
    """Run ``examples/<name>.py``'s ``main()``, which reads its options from ``sys.argv``."""
    module = load_example(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", *argv])
    return module, module.main()


def test_quickstart_prints_an_episode(monkeypatch, capsys):
    run_script("quickstart", monkeypatch, "--num-envs", "4", "--max-new-tokens", "6")
    printed = capsys.readouterr().out
    assert "prompt:" in printed and "response:" in printed
    assert "score:" in printed and "KL:" in printed and "return:" in printed


def test_custom_agent_trains_on_its_toy_task(monkeypatch, capsys):
    run_script("custom_agent", monkeypatch, "--updates", "3", "--episodes", "8")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("update")]
    assert [line.split()[1] for line in lines] == ["0", "2"]  # every 5th update and the last
    assert all("score" in line and "return" in line for line in lines)


@pytest.mark.slow
def test_custom_agent_joins_the_leaderboard(tiny_cache, tmp_path, monkeypatch):
    """``--leaderboard --tiny``: the registered REINFORCE agent gets a row next to SFT and PPO."""
    import json

    from rlhf_bench.leaderboard.harness import _REGISTRY

    monkeypatch.setenv("LLM_ENV_CACHE", str(tiny_cache))  # the tiny models built once above
    monkeypatch.chdir(tmp_path)
    try:
        run_script(
            "custom_agent", monkeypatch, "--leaderboard", "--tiny", "--updates", "2", "--episodes", "8"
        )
    finally:
        _REGISTRY.pop("reinforce", None)
    board = json.loads((tmp_path / "runs" / "custom-agent" / "leaderboard.json").read_text())
    assert {"sft", "ppo", "reinforce"} <= {row["agent"] for row in board["leaderboard"]}


def test_sb3_example_runs(monkeypatch, capsys):
    run_script("sb3_ppo", monkeypatch, "--iterations", "1")
    assert "iteration  0  mean reward-model score" in capsys.readouterr().out
