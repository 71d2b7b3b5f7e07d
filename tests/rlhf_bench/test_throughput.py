"""``llm-env bench-throughput``: a tiny run end to end, its report, and its validation (no timing asserts)."""

import json
import math

import pytest
import torch

from rlhf_bench import cli
from rlhf_bench.throughput import (
    CUDA_ONLY,
    OPTIONAL,
    RATIOS,
    ROLLOUTS,
    VARIANTS,
    ThroughputSettings,
    run_throughput,
)


@pytest.mark.slow
def test_tiny_benchmark_writes_a_well_formed_report(tmp_path, capsys):
    path = tmp_path / "report.json"
    threads = torch.get_num_threads()
    argv = [
        "bench-throughput", "--shape", "tiny", "--batch-size", "2", "--prompt-length", "4",
        "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--lora-rank", "2", "--no-memory-isolation",
        "--json", str(path),
        "--quiet",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # the benchmark restores the thread count it changed
    out = capsys.readouterr().out
    assert "| env-fused |" in out and "| c/b |" in out
    report = json.loads(path.read_text())
    skipped = (*CUDA_ONLY, *OPTIONAL)  # on CPU; the peers run when named
    assert report["settings"]["variants"] == [v for v in VARIANTS if v not in skipped]
    assert set(report["variants"]) == set(ROLLOUTS) - set(skipped)
    for name, result in report["variants"].items():
        assert result["tokens"] == 2 * 3, name  # every variant generates exactly B * N tokens
        assert result["tokens_per_s"] > 0 and result["median_seconds"] > 0
        assert result["model_bytes"] > 0 and result["peak_memory_bytes"] >= 0
        assert len(result["seconds"]) == 1
    assert set(report["ratios"]) == {label for a, b, label in RATIOS if a not in skipped and b not in skipped}
    assert all(math.isfinite(value) and value > 0 for value in report["ratios"].values())
    speed = {name: r["tokens_per_s"] for name, r in report["variants"].items()}
    assert report["ratios"]["c/b"] == pytest.approx(speed["env"] / speed["monolithic"])
    assert set(report["ppo_update"]) == {"full", "lora"}
    assert all(v["tokens_per_s_per_epoch"] > 0 for v in report["ppo_update"].values())
    memory = report["lora_memory"]
    assert {"policy_alone", "adapter_disabled_reference", "fused_reference", "separate_reference"} <= set(
        memory
    )
    assert memory["separate_reference"]["model_bytes"] > memory["adapter_disabled_reference"]["model_bytes"]
    assert report["environment"]["torch"] == torch.__version__


def test_a_subset_of_variants_reports_only_their_ratios():
    settings = ThroughputSettings(
        shape="tiny", batch_size=2, prompt_length=3, new_tokens=2, repeats=2, warmup=0,
        variants=("generate,env",),
    )  # fmt: skip
    report = run_throughput(settings)
    assert list(report["variants"]) == ["generate", "env"]
    assert list(report["ratios"]) == ["c/a"]
    assert len(report["variants"]["env"]["seconds"]) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"variants": ("env", "fast")}, "unknown variants"),
        ({"shape": "gpt5"}, "shape must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"lora_rank": 0}, "lora_rank >= 1"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_settings_reject_impossible_values(options, message):
    with pytest.raises(ValueError, match=message):
        ThroughputSettings(**options)


def test_cuda_graph_variants_are_refused_on_cpu():
    settings = ThroughputSettings(shape="tiny", batch_size=1, new_tokens=1, variants=("env-graphs",))
    with pytest.raises(ValueError, match="need a CUDA device"):
        run_throughput(settings)


def test_cli_reports_bad_settings_with_exit_status_2(capsys):
    assert cli.main(["bench-throughput", "--variants", "warp", "--quiet"]) == 2
    assert "unknown variants" in capsys.readouterr().err


def test_numbered_tokenizer_has_exact_ids_and_round_trips():
    from llm_env.tiny import numbered_tokenizer

    tokenizer = numbered_tokenizer(12)
    assert len(tokenizer) == 12 and (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    text = " ".join(f"w{i}" for i in range(3, 12))
    assert tokenizer(text)["input_ids"] == list(range(3, 12))  # P words are exactly P tokens
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
