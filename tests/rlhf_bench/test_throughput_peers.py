"""The floor, the environment and the peers of ``llm-env bench-throughput`` do the same work (tiny shapes):
B responses of exactly N tokens, the reference log-probability of each sampled token, one score per response."""

import json

import pytest
import torch

from llm_env.reward import sequence_scores
from rlhf_bench.throughput import OPTIONAL, ROLLOUTS, ThroughputSettings, run_throughput
from rlhf_bench.throughput.baselines import reference_logprobs
from rlhf_bench.throughput.models import build_setup
from rlhf_bench.throughput.scaling import ScalingSettings, format_scaling, main, run_scaling

B, P, N = 3, 4, 5
COMPARED = ("floor", "env", "env-fused", "monolithic", "no-cache", "trl-grpo", "torchrl")


@pytest.fixture(scope="module")
def setup():
    settings = ThroughputSettings(shape="tiny", batch_size=B, prompt_length=P, new_tokens=N, lora_rank=2)
    return build_setup(settings)


@pytest.mark.parametrize("name", COMPARED)
def test_every_variant_samples_n_tokens_with_their_reference_logprobs_and_one_score_each(setup, name):
    for package in ROLLOUTS[name].requires:
        pytest.importorskip(package)
    variant = ROLLOUTS[name].build(setup)
    out = variant.rollout(0)
    assert out.prompt_ids.shape == (B, P)
    assert out.responses.shape == (B, N) and out.tokens == B * N
    assert out.ref_logprobs.shape == (B, N) and out.scores.shape == (B,)
    assert variant.run(1) == B * N  # the timed path counts the same tokens
    # They are the reference's log-probabilities and the reward model's scores of the sampled sequences
    # (the reference is the untrained policy); rows holding a special token are left out, because the
    # peers mask a sampled pad id and the environment's texts drop it.
    sequences = torch.cat([out.prompt_ids, out.responses], dim=1)
    clean = (out.responses >= 3).all(dim=1)
    assert clean.any()
    with torch.no_grad():
        expected = reference_logprobs(setup.policy, sequences, P)
        scores = sequence_scores(setup.reward, sequences, torch.ones_like(sequences))
    torch.testing.assert_close(out.ref_logprobs[clean].float(), expected[clean], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores[clean].float(), scores[clean], atol=1e-4, rtol=1e-4)


def test_the_report_gives_every_variant_as_a_ratio_of_the_floor(setup):
    settings = ThroughputSettings(
        shape="tiny",
        batch_size=2,
        prompt_length=3,
        new_tokens=2,
        repeats=1,
        warmup=0,
        variants=("floor,env",),
    )
    report = run_throughput(settings)
    assert report["variants"]["floor"]["ratio_to_floor"] == 1.0
    env = report["variants"]["env"]
    assert env["ratio_to_floor"] == pytest.approx(report["ratios"]["c/f"])
    assert len(env["load_average"]) == len(env["seconds"]) == 1
    assert "load_average_start" in report and "load_average_end" in report


def test_a_peer_whose_packages_are_missing_is_skipped_with_its_reason(monkeypatch, capsys):
    import importlib.util

    from rlhf_bench import cli

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a)
    )
    argv = [
        "bench-throughput", "--shape", "tiny", "--batch-size", "2", "--prompt-length", "3", "--new-tokens", "2",
        "--repeats", "1", "--warmup", "0", "--variants", "floor", "trl-grpo",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "trl-grpo needs trl, not installed" in captured.err
    assert "| floor |" in captured.out and "| trl-grpo |" not in captured.out
    assert "Skipped: trl-grpo needs trl" in captured.out


def test_peers_run_only_when_named():
    assert set(OPTIONAL) == {"trl-grpo", "torchrl"}
    assert all(ROLLOUTS[name].requires for name in OPTIONAL)


def test_the_scaling_sweep_writes_its_tables_plot_and_json(tmp_path, capsys):
    out = tmp_path / "scaling"
    argv = [
        "--shape", "tiny", "--batch-sizes", "1", "2", "--new-tokens", "2", "3", "--variants", "env",
        "--repeats", "1", "--warmup", "0", "--large-tokens", "6", "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["settings"]["variants"] == ["floor", "env"]
    assert [(c["settings"]["batch_size"], c["settings"]["new_tokens"]) for c in report["cells"]] == [
        (1, 2), (1, 3), (2, 2), (2, 3),
    ]  # fmt: skip
    large = report["cells"][-1]["settings"]  # 2 x 3 = 6 tokens: a large cell, no warm-up
    assert (large["warmup"], large["repeats"]) == (0, 1)
    table = out.with_suffix(".md").read_text()
    assert "env / floor" in table and table.strip() == format_scaling(report).strip()
    assert out.with_suffix(".png").stat().st_size > 0
    assert "env / floor" in capsys.readouterr().out


def test_scaling_settings_reject_impossible_values(tmp_path):
    with pytest.raises(ValueError, match="batch_sizes must be positive"):
        ScalingSettings(batch_sizes=(0,))
    with pytest.raises(ValueError, match="unknown variants"):
        ScalingSettings(variants=("env", "warp"))
    settings = ScalingSettings(
        shape="tiny", batch_sizes=(1,), new_tokens=(1,), repeats=1, out=str(tmp_path / "s")
    )
    assert run_scaling(settings)["cells"][0]["variants"]["floor"]["tokens"] == 1
