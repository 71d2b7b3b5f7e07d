"""The command line on N processes: ``torchrun --nproc-per-node 2 -m rlhf_bench ppo ...`` (gloo, CPU) and
``llm-env benchmark --nproc 2`` (PPO and rejection sampling; GRPO and DPO, on the session's tiny artifacts;
GRPO and PPO on a reasoning-gym task, with its own settings). Launches have a timeout that fails the test
instead of hanging."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agents.policy import TokenSampler
from llm_env.models import load_causal_lm
from llm_env.tiny import tiny_gpt2, word_tokenizer
from rlhf_bench.leaderboard import BenchmarkContext, BenchmarkSettings, build_artifacts, run_benchmark
from rlhf_bench.leaderboard.reasoning_gym import count_bits_settings

pytestmark = pytest.mark.slow

CORPUS = ["the film was good and the actors were great", "a great movie with a good story and fine music"]
PROMPTS = ["the film was", "a great movie", "the actors were", "a good story", "the music was", "a film"]


@pytest.fixture
def models(tmp_path):
    tokenizer = word_tokenizer(CORPUS)
    for name, kwargs in (("policy", {"seed": 2}), ("rm", {"seed": 4, "classifier": True})):
        tiny_gpt2(tokenizer, **kwargs).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp_path


def test_ppo_command_under_torchrun_trains_writes_once_and_resumes(models, torchrun):
    options = [
        "ppo", "--policy", models / "policy", "--prompts", models / "prompts.jsonl", "--reward", models / "rm",
        "--out", models / "out", "--episodes-per-update", 4, "--minibatch-size", 2,
        "--max-new-tokens", 4, "--learning-rate", 1e-3, "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    code, output = torchrun("-m rlhf_bench", *options, "--num-envs", 2, "--updates", 2)
    assert code == 0, output[-6000:]
    assert output.count("ppo: 2 updates") == 1  # rank 0 reports, once
    history = json.loads((models / "out" / "history.json").read_text())
    assert [h["update"] for h in history] == [1, 2]
    assert (models / "out" / "policy" / "config.json").is_file()
    checkpoint = torch.load(models / "out" / "checkpoint" / "training.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2

    code, output = torchrun("-m rlhf_bench", *options, "--num-envs", 2, "--updates", 3, "--resume")
    assert code == 0, output[-6000:]
    assert [h["update"] for h in json.loads((models / "out" / "history.json").read_text())] == [3]

    # 6 prompts for 2 ranks x 4 envs: refused before any training, naming the numbers.
    code, output = torchrun("-m rlhf_bench", *options, "--num-envs", 4, "--updates", 1)
    assert code != 0 and "6 prompts cannot give 2 ranks x 4 envs a disjoint shard each" in output


def test_benchmark_trains_ppo_and_rejection_sampling_on_two_processes(tmp_path, tiny_cache, fail_after):
    settings = BenchmarkSettings.tiny(sweep_kl_coefs=())
    with fail_after(600):
        result = run_benchmark(
            settings,
            agents=["ppo", "rejection-sampling"],
            device="cpu",
            out_dir=tmp_path / "out",
            cache_dir=tiny_cache[0],
            progress=False,
            log=lambda _: None,
            nproc=2,
        )
    rows = {row.agent: row for row in result.rows}
    assert {"sft", "ppo", "rejection-sampling"} <= set(rows)
    for name in ("ppo", "rejection-sampling"):
        # Trained, evaluated here: the SFT policy's own KL estimate is 0 up to float rounding (1e-9); a trained
        # row's is not, though at these toy sizes the sample estimate of a tiny KL may come out negative.
        assert 0.0 <= rows[name].win_rate <= 1.0 and abs(rows[name].kl) > 1e-5
    ppo = result.records["ppo"]  # the workers' records came back
    assert (
        ppo["sampled_tokens"]
        >= settings.token_budget
        > ppo["sampled_tokens"] - ppo["history"][-1]["response_length"] * settings.ppo_episodes
    )  # stopped at the update that reached the budget, counting both ranks' tokens
    assert [p["fraction"] for p in ppo["curve"]] == [0.0, 0.5, 1.0]  # rank 0 evaluated along training
    assert ppo["curve"][-1]["update"] == len(ppo["history"])
    # Every rank's rollouts were scored by its own proxy: the row counts both ranks' reward-model calls.
    assert rows["ppo"].reward_calls == settings.ppo_episodes * len(ppo["history"])
    assert rows["ppo"].gradient_steps == ppo["history"][-1]["optimizer_steps"] > 0
    assert len(result.records["rejection-sampling"]["history"]) == settings.rs_rounds


def test_benchmark_trains_grpo_and_dpo_on_two_processes(tmp_path, tiny_cache, fail_after):
    """``llm-env benchmark --nproc 2 --agents sft,grpo,dpo --tiny``: the critic-free and DPO rows train on 2
    processes (the workers run their row factories) and are evaluated here."""
    settings = BenchmarkSettings.tiny(sweep_kl_coefs=())
    with fail_after(600):
        result = run_benchmark(
            settings,
            agents=["sft", "grpo", "dpo"],
            device="cpu",
            out_dir=tmp_path / "out",
            cache_dir=tiny_cache[0],
            progress=False,
            log=lambda _: None,
            nproc=2,
        )
    rows = {row.agent: row for row in result.rows}
    assert {"sft", "grpo", "dpo"} <= set(rows)
    for name in ("grpo", "dpo"):
        # Trained, evaluated here: the SFT policy's own KL estimate is 0 up to float rounding (1e-9); a trained
        # row's is not, though at these toy sizes the sample estimate of a tiny KL may come out negative.
        assert 0.0 <= rows[name].win_rate <= 1.0 and abs(rows[name].kl) > 1e-5
    grpo = result.records["grpo"]  # the workers' records came back
    spent = [0] + [h["sampled_tokens"] for h in grpo["history"]]
    assert grpo["sampled_tokens"] == spent[-1] >= settings.token_budget > spent[-2]  # both ranks' tokens
    dpo = result.records["dpo"]  # every batch dealt across the ranks: as many steps as in one process
    assert len(dpo["history"]) == settings.dpo_epochs * -(-dpo["pairs"] // settings.dpo_batch_size)


def test_benchmark_trains_a_reasoning_gym_task_on_two_processes(tmp_path, fail_after):
    """``llm-env benchmark --task rg-count-bits --nproc 2 --agents grpo,ppo``: the workers rebuild the task
    (scratchpad, systematic mistake, its checker) from the parent's cache and train with the task's own
    settings, not the preset's; the parent evaluates the rows, pass@k included."""
    pytest.importorskip("reasoning_gym")
    # The tiny preset's SFT policy (400 solutions, 12 new tokens) never writes "answer:" on count_bits, so
    # the checker ranks no pairs; 1,000 at a higher rate with room for the scratchpad (" 101110 answer: 4")
    # solves about 14% (11 s to build on 2 busy CPU cores); starting the workers (10 s a launch) is the rest.
    preset = BenchmarkSettings.tiny(
        sweep_kl_coefs=(),
        max_new_tokens=20,
        pretrain_texts=1000,
        sft_pairs=1000,
        sft_lr=0.01,
        rm_prompts=100,
        rm_eval_prompts=50,
    )
    settings = count_bits_settings(preset)
    cache = tmp_path / "cache"
    artifacts = build_artifacts(
        settings, task="rg-count-bits", cache_dir=cache, progress=False, log=lambda _: None
    )  # what the parent builds first; the run below, and its workers, load it
    built = {path: path.stat().st_mtime_ns for path in artifacts.directory.rglob("*")}
    with fail_after(300):
        result = run_benchmark(
            preset,
            task="rg-count-bits",
            agents=["grpo", "ppo"],
            device="cpu",
            out_dir=tmp_path / "out",
            cache_dir=cache,
            progress=False,
            log=lambda _: None,
            nproc=2,
        )
    assert result.task == "rg-count-bits" and result.verifiable
    # The task's own settings, recorded and applied: twice the budget, one minibatch of one pass, 6e-4.
    assert result.settings == settings.to_dict() and settings.token_budget == 2 * preset.token_budget
    assert result.task_settings["token_budget"] == {"preset": 120, "task": 240}
    assert result.task_settings["ppo_lr"] == {"preset": 1e-4, "task": 6e-4}
    assert result.task_settings["minibatches"] == {"preset": 4, "task": 1}
    # Nothing was rebuilt, by the parent or a worker: they all loaded the one cached task directory.
    assert list((cache / "benchmark").iterdir()) == [artifacts.directory]
    assert {path: path.stat().st_mtime_ns for path in artifacts.directory.rglob("*")} == built
    # Rank 0's evaluation before training is the parent's cached SFT policy on the parent's held-out
    # prompts, scored by the checker, prompt by prompt (one draw each, the evaluation seed).
    ctx = BenchmarkContext(artifacts, settings, torch.device("cpu"), tmp_path / "sft", log=lambda _: None)
    policy = load_causal_lm(artifacts.policy_path, device="cpu", dtype=torch.float32).eval()
    sft = ctx.evaluate(TokenSampler(policy), "sft", prompts=settings.curve_prompts, samples=1)

    rows = {row.agent: row for row in result.rows}
    assert set(rows) == {"sft", "grpo", "ppo"}
    assert result.pass_at_k["ks"] == [1, 2, 4] and result.pass_at_k["samples"] == settings.pass_k_samples
    for name in ("grpo", "ppo"):
        record, row = result.records[name], rows[name]  # the workers' records came back
        spent = [0] + [h["sampled_tokens"] for h in record["history"]]
        assert record["token_budget"] == 240 and record["sampled_tokens"] == spent[-1] >= 240 > spent[-2]
        assert [h["learning_rate"] for h in record["history"]] == [6e-4] * len(record["history"])
        # One optimizer step per update (the preset's 4 passes x 4 minibatches would make 16).
        assert row.gradient_steps == record["history"][-1]["optimizer_steps"] == len(record["history"])
        assert row.reward_calls == settings.ppo_episodes * len(record["history"])  # both ranks' episodes
        assert [p["fraction"] for p in record["curve"]] == [0.0, 0.5, 1.0]
        assert record["curve"][-1]["update"] == len(record["history"])
        before = record["curve"][0]["per_prompt"]
        np.testing.assert_array_equal(before["gold"], sft.per_prompt("gold"))
        np.testing.assert_array_equal(before["response_length"], sft.per_prompt("response_length"))
        assert 0.0 <= row.gold <= 1.0 and row.gold == row.proxy  # the checker is reward and gold
        passes = [row.pass_at_k[k].mean for k in (1, 2, 4)]
        assert passes == sorted(passes) and "pass_at_1_vs_sft" in row.as_dict()
    assert sft.per_prompt("gold").any()  # the SFT policy solves some: the comparison above has signal
    assert abs(rows["grpo"].kl) > 1e-5  # trained (PPO may see only 0 scores at this size: no gradient)


def test_bench_throughput_under_torchrun_counts_every_rank(tmp_path, torchrun):
    """2 processes x 1 thread: each rank generates its batch, the report counts both ranks' tokens and the
    PPO update is data-parallel (no timing asserts: the machine is shared)."""
    options = [
        "bench-throughput", "--shape", "tiny", "--batch-size", 2, "--prompt-length", 4, "--new-tokens", 3,
        "--repeats", 1, "--warmup", 0, "--threads", 1, "--variants", "env", "env-fused", "ppo-update",
        "--json", tmp_path / "report.json",
    ]  # fmt: skip
    code, output = torchrun("-m rlhf_bench", *options)
    assert code == 0, output[-6000:]
    assert output.count("| variant | tokens/s |") == 1  # rank 0 reports
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["environment"]["processes"] == 2 and report["environment"]["torch_threads"] == 1
    assert report["variants"]["env"]["tokens"] == 2 * 2 * 3  # ranks x batch x new tokens
    assert report["ppo_update"]["full"]["tokens"] == 2 * 2 * 3
