"""``llm-env train-rm`` run in-process on tiny models saved to disk."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llm_env.tiny import tiny_llama
from rewards import RewardModel, save_preferences, simulate_preferences
from rlhf_bench.cli import main


def test_train_rm_from_a_causal_lm_prints_per_level_accuracy(task, tmp_path, capsys):
    model_dir = tmp_path / "llama"
    tiny_llama(task.tokenizer, seed=0).save_pretrained(model_dir)  # a causal LM: gets a new scalar head
    task.tokenizer.save_pretrained(model_dir)
    data = simulate_preferences(
        task.prompts[:120], task.policy(0), task.gold, pairs_per_prompt=2, temperature=0.5,
        level_thresholds=(2.0, 1.0, 0.5), seed=0,
    )  # fmt: skip
    save_preferences(data, tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    code = main(
        [
            "train-rm", "--data", str(tmp_path / "prefs.jsonl"), "--model", str(model_dir), "--out", str(out),
            "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--margin-table", "large",
            "--eval-fraction", "0.2", "--seed", "1", "--device", "cpu", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "significantly_better" in printed and "accuracy" in printed and "saved to" in printed
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["config"]["margin_table"] == "large" and metrics["config"]["epochs"] == 2
    for level, m in metrics["eval"]["per_level"].items():
        assert f"{level:<22} {m['count']:>6d} {m['accuracy']:>9.3f}" in printed
    rm = RewardModel.from_pretrained(out)
    assert rm.stats is not None and rm.stats.count > 0
    plain = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForSequenceClassification"
    ids = torch.tensor([task.tokenizer("review film 0 : good good")["input_ids"]])
    with torch.no_grad():
        assert plain(input_ids=ids).logits[0, 0].item() == pytest.approx(
            rm(["review film 0 :"], [" good good"]).item()
        )


def test_train_rm_with_lora_and_a_classifier_checkpoint(tmp_path, saved_classifier, capsys):
    rows = [
        {"prompt": "the film was", "chosen": " good", "rejected": " bad", "level": "better"},
        {"prompt": "the food was", "chosen": " great", "rejected": " cold", "level": "slightly better"},
        {"prompt": "a", "responses": [" great movie", " good story", " dull plot"]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(
        [
            "train-rm", "--data", str(tmp_path / "d.jsonl"), "--model", str(saved_classifier),
            "--out", str(tmp_path / "rm"), "--lora-rank", "2", "--eval-fraction", "0", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert "no held-out data" in capsys.readouterr().out
    assert not RewardModel.from_pretrained(tmp_path / "rm").is_lora


def test_train_rm_reports_a_malformed_line(tmp_path, saved_classifier, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "p", "chosen": " a"}\n')
    code = main(
        ["train-rm", "--data", str(path), "--model", str(saved_classifier), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert f"{path}:2: missing field 'rejected'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    code = main(["train-rm", "--data", str(path), "--model", "m", "--out", "o", "--lora-alpha", "8"])
    assert code == 2 and "set lora_rank > 0" in capsys.readouterr().err
