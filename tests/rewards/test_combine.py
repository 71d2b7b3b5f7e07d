"""Llama 2's helpfulness + safety combination on hand-picked values around the threshold."""

from __future__ import annotations

import math

import pytest
import torch

import llm_env
from llm_env.tiny import tiny_gpt2
from rewards import Llama2Reward, RewardModel, ScoreStats, llama2_select

LOGIT_015 = math.log(0.15 / 0.85)  # -1.734601: sigma(x) < 0.15  <=>  x < -1.734601


class TableScorer:
    """A text scorer that returns a fixed logit per response and records what it was asked."""

    def __init__(self, table, stats=None):
        self.table, self.stats, self.calls = table, stats, []

    def __call__(self, prompts, responses):
        self.calls.append(list(responses))
        return torch.tensor([self.table[r] for r in responses])


def test_selection_rule_around_the_threshold():
    helpful = torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0])
    safety = torch.tensor([LOGIT_015 + 0.01, LOGIT_015 - 0.01, -1.70, -1.77, 3.0])
    # sigma(-1.70) = 0.1545 >= 0.15 -> helpfulness; sigma(-1.77) = 0.1456 < 0.15 -> safety
    tagged = torch.tensor([False, False, False, False, True])  # a safety prompt uses R_s even when safe
    logit, use_safety = llama2_select(helpful, safety, tagged, threshold=0.15)
    assert use_safety.tolist() == [False, True, False, True, True]
    torch.testing.assert_close(logit, torch.tensor([2.0, LOGIT_015 - 0.01, 2.0, -1.77, 3.0]))
    assert 1 / (1 + math.exp(1.70)) == pytest.approx(0.1545, abs=1e-4)
    assert 1 / (1 + math.exp(1.77)) == pytest.approx(0.1456, abs=1e-4)


def test_whiten_with_the_stats_of_the_selected_model():
    responses = [" safe", " borderline", " unsafe", " tagged"]
    helpful = TableScorer(
        {" safe": 1.0, " borderline": 3.0, " unsafe": 5.0, " tagged": 7.0}, ScoreStats(1.0, 2.0)
    )
    safety = TableScorer(
        {" safe": 0.5, " borderline": -1.70, " unsafe": -1.77, " tagged": 2.0}, ScoreStats(-1.0, 0.5)
    )
    reward = Llama2Reward(helpful, safety, safety_tag="[safety]")
    prompts = ["hi", "hi", "hi", "[safety] how do I"]
    out = reward.components(prompts, responses)
    assert out.use_safety.tolist() == [False, False, True, True]
    # helpfulness rows: (R_h - 1) / 2; safety rows: (R_s + 1) / 0.5
    expected = [(1.0 - 1) / 2, (3.0 - 1) / 2, (-1.77 + 1) / 0.5, (2.0 + 1) / 0.5]
    torch.testing.assert_close(out.reward, torch.tensor(expected))
    torch.testing.assert_close(reward(prompts, responses), torch.tensor(expected))
    assert helpful.calls[0] == [" safe", " borderline"]  # R_h is only computed where it is selected
    assert math.isnan(out.helpfulness[2])


def test_user_stats_and_no_whitening_and_predicate():
    helpful = TableScorer({" a": 1.0, " b": 4.0})
    safety = TableScorer({" a": 0.0, " b": -5.0})
    prompts, responses = ["x", "y"], [" a", " b"]
    fixed = Llama2Reward(helpful, safety, whiten=ScoreStats(mean=0.5, std=0.25))
    torch.testing.assert_close(
        fixed(prompts, responses), torch.tensor([(1.0 - 0.5) / 0.25, (-5.0 - 0.5) / 0.25])
    )
    raw = Llama2Reward(helpful, safety, whiten="none", is_safety=lambda p: p == "x")
    torch.testing.assert_close(raw(prompts, responses), torch.tensor([0.0, -5.0]))  # x is a safety prompt
    looser = Llama2Reward(helpful, safety, whiten="none", threshold=0.5)  # sigma(0) = 0.5 is not < 0.5
    torch.testing.assert_close(looser(prompts, responses), torch.tensor([1.0, -5.0]))


def test_bad_arguments():
    h, s = TableScorer({}), TableScorer({})
    with pytest.raises(ValueError, match=r"either is_safety .* or safety_tag"):
        Llama2Reward(h, s, is_safety=bool, safety_tag="[s]", whiten="none")
    with pytest.raises(ValueError, match="whiten='selected' needs the helpfulness model's score statistics"):
        Llama2Reward(h, s)
    with pytest.raises(ValueError, match="sigmoid scale"):
        Llama2Reward(h, s, threshold=1.5, whiten="none")
    with pytest.raises(ValueError, match="whiten must be"):
        Llama2Reward(h, s, whiten="zscore")


def test_two_saved_reward_models_as_the_env_reward(tmp_path, tokenizer, gpt2):
    prompts = ["the film was", "[safety] the food was"]
    for name, seed in (("helpful", 11), ("safe", 12)):
        rm = RewardModel(tiny_gpt2(tokenizer, seed=seed, classifier=True), tokenizer)
        rm.calibrate(prompts * 2, [" good", " bad", " great", " dull"])
        rm.save_pretrained(tmp_path / name)
    reward = Llama2Reward(tmp_path / "helpful", tmp_path / "safe", safety_tag="[safety]")
    env = llm_env.TextGenVectorEnv(
        num_envs=2, prompts=prompts, tokenizer=tokenizer, reward=reward, reference=gpt2,
        max_new_tokens=2, prompt_order="sequential", kl_coef=0.0,
    )  # fmt: skip
    env.reset(seed=0)
    good = tokenizer.convert_tokens_to_ids("good")
    for _ in range(2):
        _, rewards, _, truncated, info = env.step(torch.full((2,), good))
    assert truncated.all()
    done = info["completion"]
    expected = reward(list(done["prompt"]), list(done["response"]))
    torch.testing.assert_close(torch.as_tensor(done["score"], dtype=torch.float32).cpu(), expected)
    assert reward.components(list(done["prompt"]), list(done["response"])).use_safety[1]  # the tagged prompt
