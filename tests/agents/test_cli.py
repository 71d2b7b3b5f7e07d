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


PG_ARGS = ["--prompts-per-update", "2", "--group-size", "2", "--learning-rate", "1e-3", "--kl-coef", "0.05"]


def test_grpo_cli_trains_saves_and_resumes(saved_gpt2, saved_classifier, prompt_file, tmp_path, capsys):
    out = tmp_path / "grpo"
    args = [
        "grpo",
        "--policy",
        str(saved_gpt2),
        "--prompts",
        str(prompt_file),
        "--reward",
        str(saved_classifier),
    ]
    args += ["--out", str(out), *COMMON, *PG_ARGS, "--kl-in", "loss", "--kl-estimator", "k2"]
    assert main([*args, "--updates", "2"]) == 0
    assert "grpo: 2 updates" in capsys.readouterr().out
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and history[0]["kl_loss"] >= 0
    AutoModelForCausalLM.from_pretrained(out / "policy")
    assert main([*args, "--updates", "3", "--resume"]) == 0  # one more update from the checkpoint
    assert "grpo: 3 updates" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        "rloo",
        *(
            pytest.param(c, marks=pytest.mark.slow)
            for c in ("dr-grpo", "dapo", "gspo", "reinforce-pp", "remax")
        ),
    ],
)
def test_critic_free_clis_stop_at_the_token_budget(
    command, saved_gpt2, saved_classifier, prompt_file, tmp_path, capsys
):
    out = tmp_path / command
    args = [
        command,
        "--policy",
        str(saved_gpt2),
        "--prompts",
        str(prompt_file),
        "--reward",
        str(saved_classifier),
    ]
    grouped = command not in ("reinforce-pp", "remax")
    options = PG_ARGS if grouped else [*PG_ARGS[:2], "--group-size", "1", *PG_ARGS[4:]]
    if command == "gspo":  # its default minibatch (16 of 64 episodes, as the paper's 4) does not divide 4
        options = [*options, "--minibatch-size", "2"]
    assert main([*args, "--out", str(out), *COMMON, *options, "--total-tokens", "10"]) == 0
    history = json.loads((out / "history.json").read_text())
    assert (
        history[-1]["sampled_tokens"] >= 10
        and f"{command}: {len(history)} updates" in capsys.readouterr().out
    )


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
