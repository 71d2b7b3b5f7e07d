"""Reward-model training on 2 gloo processes (CPU) equals training in one process on the same data.

The test launches this file under torchrun (1 thread per rank); rank 0 writes the trained weights and the
metrics, which are compared with the same training run here. The launch fails on a timeout, never hangs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llm_env.distributed import init_distributed, is_main_process
from llm_env.tiny import tiny_gpt2, word_tokenizer
from rewards import (
    RewardTrainingConfig,
    save_preferences,
    simulate_preferences,
    simulate_rankings,
    train_reward_model,
)

pytestmark = pytest.mark.slow

WORDS = ["great", "good", "fine", "dull", "bad", "awful", "the", "film", "was", "and", "review", ":"]
GOLD = {"great": 2.0, "good": 1.0, "fine": 0.5, "dull": -0.5, "bad": -1.0, "awful": -2.0}
CONFIG = dict(
    epochs=2,
    batch_size=4,  # 9 training comparisons: batches of 4, 4 and 1 (fewer comparisons than ranks)
    lr=3e-3,
    center_coef=0.01,
    margin_table="small",
    eval_fraction=0.25,
    progress=False,
    seed=0,
)


def gold(prompts, responses):
    return [sum(GOLD.get(w, 0.0) for w in r.split()) for r in responses]


def sample(prompts, k):
    import random

    rng = random.Random(len(prompts) * 31 + k)
    return [[" " + " ".join(rng.choice(WORDS[:8]) for _ in range(4)) for _ in range(k)] for _ in prompts]


@pytest.fixture
def work(tmp_path):
    """A saved tiny classifier without dropout (training runs in train mode) and mixed preference data."""
    tokenizer = word_tokenizer([" ".join(WORDS)])
    model = tiny_gpt2(tokenizer, seed=4, classifier=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = [f"review film {i} :" for i in range(12)]
    data = simulate_preferences(
        prompts[:8], sample, gold, pairs_per_prompt=1, level_thresholds=(2, 1, 0.5), seed=0
    )
    data += simulate_rankings(prompts[8:], sample, gold, k=3, seed=0)  # K-way rankings: groups of 3 pairs
    save_preferences(data, tmp_path / "prefs.jsonl")
    return tmp_path


def test_reward_model_training_on_two_ranks_equals_one_process(work, torchrun):
    code, output = torchrun(__file__, work)
    assert code == 0, output[-6000:]
    result = train_reward_model(
        str(work / "rm"), str(work / "prefs.jsonl"), config=RewardTrainingConfig(**CONFIG)
    )
    two = load_file(work / "trained.safetensors")
    for name, value in result.model.model.state_dict().items():
        torch.testing.assert_close(two[name], value, atol=2e-5, rtol=1e-4, msg=name)
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["train_loss"] == pytest.approx(result.metrics["train_loss"], rel=1e-5)
    assert metrics["steps"] == result.metrics["steps"] == 6  # ceil(9 / 4) x 2 epochs, the same on 2 ranks
    assert metrics["eval"]["accuracy"] == pytest.approx(result.metrics["eval"]["accuracy"])
    per_level = result.metrics["eval"]["per_level"]
    assert metrics["eval"]["per_level"].keys() == per_level.keys()
    for level, values in per_level.items():
        assert metrics["eval"]["per_level"][level] == pytest.approx(values, rel=1e-4, abs=1e-6), level
    assert metrics["stats"] == pytest.approx(result.metrics["stats"], rel=1e-4)


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_distributed()
    directory = Path(sys.argv[1])
    trained = train_reward_model(
        str(directory / "rm"), str(directory / "prefs.jsonl"), config=RewardTrainingConfig(**CONFIG)
    )
    if is_main_process():
        state = {k: v.clone() for k, v in trained.model.model.state_dict().items()}
        save_file(state, str(directory / "trained.safetensors"))
        (directory / "metrics.json").write_text(json.dumps(trained.metrics, default=str))
