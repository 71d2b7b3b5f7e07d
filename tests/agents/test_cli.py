"""``llm-env ppo``, ``rejection-sampling``, ``dpo`` and ``online-dpo`` on models saved to disk, in process."""

import json

import pytest
from transformers import AutoModelForCausalLM

from rlhf_bench.cli import main


@pytest.fixture
def prompt_file(tmp_path, task_prompts):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task_prompts))
    return path


COMMON = ["--num-envs", "4", "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]


def test_ppo_cli_trains_saves_and_resumes(saved_gpt2, saved_classifier, prompt_file, tmp_path, capsys):
    out = tmp_path / "ppo"
    args = [
        "ppo",
        "--policy",
        str(saved_gpt2),
        "--prompts",
        str(prompt_file),
        "--reward",
        str(saved_classifier),
    ]
    args += [
        "--out",
        str(out),
        *COMMON,
        "--episodes-per-update",
        "4",
        "--minibatch-size",
        "2",
        "--learning-rate",
        "1e-3",
    ]
    assert main([*args, "--updates", "2"]) == 0
    assert "ppo: 2 updates" in capsys.readouterr().out
    assert len(json.loads((out / "history.json").read_text())) == 2
    AutoModelForCausalLM.from_pretrained(out / "policy")  # a plain transformers checkpoint
    assert main([*args, "--updates", "3", "--resume"]) == 0  # continues from the checkpoint: one more update
    assert "ppo: 3 updates" in capsys.readouterr().out
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_rejection_sampling_cli_reports_the_best_of_k_kl(
    saved_gpt2, saved_classifier, prompt_file, tmp_path, capsys
):
    out = tmp_path / "rs"
    args = ["rejection-sampling", "--policy", str(saved_gpt2), "--prompts", str(prompt_file)]
    args += ["--reward", str(saved_classifier), "--out", str(out), *COMMON, "--k", "3", "--kl-groups", "2"]
    assert main([*args, "--rounds", "1", "--sft-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "best-of-3" in printed and "theory 0.432" in printed
    AutoModelForCausalLM.from_pretrained(out / "policy")


def test_cli_rejects_bad_config_values(saved_gpt2, saved_classifier, prompt_file, tmp_path):
    args = [
        "ppo",
        "--policy",
        str(saved_gpt2),
        "--prompts",
        str(prompt_file),
        "--reward",
        str(saved_classifier),
    ]
    with pytest.raises(ValueError, match="must divide episodes_per_update"):
        main([*args, "--out", str(tmp_path), "--episodes-per-update", "6", "--minibatch-size", "4"])
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path), "--lr-schedule", "exponential"])


def test_dpo_cli_trains_on_preference_files_saves_and_resumes(saved_gpt2, tmp_path, capsys):
    rows = [
        {"prompt": "the film was", "chosen": " good and fun", "rejected": " bad", "level": "better"},
        {"prompt": "a great movie", "chosen": " with a good story", "rejected": " dull"},
        {"prompt": "i liked the", "chosen": " actors", "rejected": " ending was weak"},
    ]
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    second.write_text(json.dumps(rows[2]) + "\n")
    out = tmp_path / "dpo"
    args = ["dpo", "--policy", str(saved_gpt2), "--data", str(first), str(second), "--out", str(out)]
    args += [
        "--device",
        "cpu",
        "--no-progress",
        "--batch-size",
        "2",
        "--learning-rate",
        "1e-3",
        "--loss",
        "ipo",
    ]
    assert main([*args, "--epochs", "1"]) == 0  # --loss abbreviates --loss-type
    assert "ipo: 2 steps on 3 pairs" in capsys.readouterr().out
    assert len(json.loads((out / "history.json").read_text())) == 2
    AutoModelForCausalLM.from_pretrained(out / "policy")
    assert main([*args, "--epochs", "2", "--resume"]) == 0  # continues from the checkpoint: two more steps
    assert "ipo: 4 steps on 3 pairs" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field 'rejected'"):
        main(["dpo", "--policy", str(saved_gpt2), "--data", str(bad), "--out", str(tmp_path / "x")])


def test_online_dpo_cli_trains_saves_and_resumes(saved_gpt2, saved_classifier, prompt_file, tmp_path, capsys):
    out = tmp_path / "online"
    args = ["online-dpo", "--policy", str(saved_gpt2), "--prompts", str(prompt_file)]
    args += ["--reward", str(saved_classifier), "--out", str(out), *COMMON]
    args += ["--prompts-per-update", "4", "--minibatch-size", "2", "--learning-rate", "1e-3", "--beta", "0.2"]
    assert main([*args, "--updates", "2"]) == 0
    printed = capsys.readouterr().out
    assert "online-dpo: 2 updates" in printed and "tied pairs skipped" in printed
    assert len(json.loads((out / "history.json").read_text())) == 2
    AutoModelForCausalLM.from_pretrained(out / "policy")
    assert main([*args, "--updates", "3", "--resume"]) == 0
    assert "online-dpo: 3 updates" in capsys.readouterr().out
    with pytest.raises(ValueError, match="minibatch_size"):
        main([*args, "--updates", "1", "--minibatch-size", "8"])
