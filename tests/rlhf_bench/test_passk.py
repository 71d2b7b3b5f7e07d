"""pass@k on verifiable tasks and the response length along training: per-prompt pass@k from an evaluation
(exactly-correct answers only), the rows and columns that carry it, and a tiny sorting run end to end (every
evaluated agent's pass@k from its own samples, the plots, the curves' response lengths)."""

import csv
import json

import numpy as np
import pytest

from rlhf_bench.leaderboard import BenchmarkSettings, run_benchmark
from rlhf_bench.leaderboard.harness import BenchmarkContext, EvalResult
from rlhf_bench.leaderboard.passk import pass_at_k_table, pass_ks, per_prompt_pass_at_k
from rlhf_bench.leaderboard.rows import SeedRow, summarise
from rlhf_bench.leaderboard.stats import Resampler
from rlhf_bench.leaderboard.table import columns, csv_fields, format_table, ranked

PNG = b"\x89PNG\r\n\x1a\n"


def evaluation(gold: list[list[float]]) -> EvalResult:
    """An evaluation with ``gold[p]`` the checker scores of prompt p's draws (episodes shuffled, as the
    environment finishes them)."""
    index = np.repeat(np.arange(len(gold)), [len(g) for g in gold])
    sample = np.concatenate([np.arange(len(g)) for g in gold])
    scores = np.concatenate([np.asarray(g, dtype=float) for g in gold])
    order = np.random.default_rng(0).permutation(len(index))
    n = len(index)
    return EvalResult(
        name="x",
        prompts=["p"] * n,
        responses=["r"] * n,
        prompt_index=index[order],
        sample=sample[order],
        proxy=scores[order],
        gold=scores[order],
        kl=np.zeros(n),
        lengths=np.full(n, 3),
        tokens_per_s=1.0,
        seconds=1.0,
    )


def test_the_curve_takes_powers_of_two_up_to_the_samples():
    assert pass_ks(16) == (1, 2, 4, 8, 16)
    assert pass_ks(4) == (1, 2, 4) and pass_ks(6) == (1, 2, 4) and pass_ks(1) == (1,)
    with pytest.raises(ValueError, match="at least one sample per prompt"):
        pass_ks(0)


def test_only_exactly_correct_answers_count():
    # Prompt 0: one of four correct (the 0.75 and 0.99 are partial credit); prompt 1: none; prompt 2: all.
    result = evaluation([[0.75, 1.0, 0.0, 0.99], [0.5, 0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = per_prompt_pass_at_k(result, pass_ks(4))
    np.testing.assert_allclose(values[1], [0.25, 0.0, 1.0])
    np.testing.assert_allclose(values[2], [0.5, 0.0, 1.0])  # 1 - C(3, 2) / C(4, 2)
    np.testing.assert_allclose(values[4], [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="at least k=8 samples"):
        per_prompt_pass_at_k(result, [8])
    result.gold = None
    with pytest.raises(ValueError, match="needs a checker"):
        per_prompt_pass_at_k(result, [1])


def test_rows_carry_pass_at_k_with_intervals_into_the_columns_and_the_csv():
    values = {
        "gold": np.arange(4.0) / 4,
        "proxy": np.arange(4.0) / 4,
        "kl": np.zeros(4),
        "win_rate": np.full(4, 0.5),
    }
    passes = {1: np.array([0.0, 0.25, 0.5, 1.0]), 2: np.array([0.0, 0.5, 5 / 6, 1.0])}
    rows = summarise(
        [[SeedRow("sft", values, pass_at_k=passes), SeedRow("best-of-2", values)]],
        Resampler.draw(1, 4, resamples=200, seed=0),
    )
    sft, best_of_2 = (row.as_dict() for row in rows)
    assert sft["pass_at_1"] == pytest.approx(0.4375) and sft["pass_at_2"] == pytest.approx(7 / 12)
    assert sft["pass_at_1_low"] <= sft["pass_at_1"] <= sft["pass_at_1_high"]
    assert "pass_at_k" not in sft and "pass_at_1" not in best_of_2  # flattened; best-of-k has none
    dicts = ranked(rows, True)
    titles = [title for _, title, _ in columns(dicts)][4:8]
    assert titles == ["gold win-rate vs SFT", "pass@1", "pass@1 - SFT", "pass@2"]
    table = format_table(dicts, markdown=True)
    assert "| pass@1 | pass@1 - SFT | pass@2 |" in table and "0.438 [" in table
    assert {"pass_at_2", "pass_at_2_low", "pass_at_2_high", "response_length"} <= set(csv_fields(dicts))
    header, body = pass_at_k_table(dicts)
    assert header == ["agent", "pass@1", "pass@2"] and [cells[0] for cells in body] == ["sft"]
    # Over seeds: the mean of the seeds' means, with the hierarchical interval (seeds, then prompts).
    other = {1: np.ones(4), 2: np.ones(4)}
    two = summarise(
        [[SeedRow("sft", values, pass_at_k=passes)], [SeedRow("sft", values, pass_at_k=other)]],
        Resampler.draw(2, 4, resamples=2000, seed=0),
    )[0]
    assert two.pass_at_k[1].mean == pytest.approx((0.4375 + 1) / 2)
    hierarchical = Resampler.draw(2, 4, resamples=2000, seed=0).estimate(np.stack([passes[1], other[1]]))
    assert two.pass_at_k[1] == hierarchical and hierarchical.high == 1.0  # a quarter draw seed 1 twice
    with pytest.raises(ValueError, match="pass@k for different k on different seeds"):
        summarise(
            [[SeedRow("sft", values, pass_at_k=passes)], [SeedRow("sft", values, pass_at_k={1: np.ones(4)})]],
            Resampler.draw(2, 4, resamples=200, seed=0),
        )
    # Off verifiable tasks nothing changes.
    plain = ranked(summarise([[SeedRow("sft", values)]], Resampler.draw(1, 4, resamples=200, seed=0)), True)
    assert "pass@1" not in format_table(plain) and not any(f.startswith("pass") for f in csv_fields(plain))


@pytest.mark.slow
def test_a_tiny_sorting_run_reports_every_agents_pass_at_k_and_the_response_length(tmp_path, monkeypatch):
    """Every evaluated agent (SFT, GRPO, random; not best-of-k) gets pass@k for k = 1, 2, 4 from its own 4
    samples per held-out prompt, drawn through ``BenchmarkContext.evaluate``: pass@1 is their share of
    exactly-correct answers, pass@4 the share of prompts with one, and the curve never falls in k."""
    # The tiny policy (2 x 32 on 400 solutions) sorts nothing exactly; 128 wide on 1,500 sorts about 17%
    # (6 s to build on 2 CPU cores), so that pass@k has correct answers to count.
    settings = BenchmarkSettings.tiny(
        sweep_kl_coefs=(),
        policy_width=128,
        pretrain_texts=1500,
        sft_pairs=1500,
        rm_prompts=60,
        rm_eval_prompts=60,
    )
    n = settings.pass_k_samples
    sampled: dict[str, EvalResult] = {}
    evaluate = BenchmarkContext.evaluate

    def spy(self, agent, name, **options):
        result = evaluate(self, agent, name, **options)
        if options.get("samples") == n and name != "best-of-k":
            sampled[name] = result
        return result

    monkeypatch.setattr(BenchmarkContext, "evaluate", spy)
    result = run_benchmark(
        settings,
        task="sorting",
        agents=["grpo", "random", "best-of-k"],
        device="cpu",
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        progress=False,
        log=lambda _: None,
    )
    out = tmp_path / "out"
    payload = json.loads((out / "leaderboard.json").read_text())
    assert payload["pass_at_k"]["ks"] == [1, 2, 4] and payload["pass_at_k"]["samples"] == n
    assert payload["pass_at_k"]["prompts"] == settings.eval_prompts
    assert set(payload["pass_at_k"]["seconds"]) == {"sft", "grpo", "random"}
    rows = {row["agent"]: row for row in payload["leaderboard"]}
    assert set(sampled) == {"sft", "grpo", "random"} and "pass_at_1" not in rows["best-of-2"]
    for name, samples in sampled.items():
        row = rows[name]
        assert len(samples.responses) == settings.eval_prompts * n
        correct = samples.gold == 1.0
        assert row["pass_at_1"] == pytest.approx(correct.mean()), name
        any_correct = [correct[samples.prompt_index == p].any() for p in range(settings.eval_prompts)]
        assert row["pass_at_4"] == pytest.approx(np.mean(any_correct)), name
        curve = [row[f"pass_at_{k}"] for k in (1, 2, 4)]
        assert curve == sorted(curve), (name, curve)
        for k in (1, 2, 4):
            assert row[f"pass_at_{k}_low"] <= row[f"pass_at_{k}"] <= row[f"pass_at_{k}_high"], (name, k)
        assert row["response_length"] > 0
    assert rows["random"]["pass_at_4"] < rows["sft"]["pass_at_4"]
    assert rows["sft"]["pass_at_1"] > 0  # the tiny SFT policy sorts some prompts: the test has signal
    # The columns and the plots.
    assert "| pass@1 | pass@1 - SFT | pass@4 |" in (out / "leaderboard.md").read_text()
    with open(out / "leaderboard.csv") as handle:
        assert {"pass_at_1", "pass_at_2_low", "pass_at_4_high"} <= set(next(csv.DictReader(handle)))
    for plot in ("pass_at_k.png", "response_length.png"):
        assert (out / plot).read_bytes()[:8] == PNG, plot
    assert "pass_at_k.png" in (out / "report.html").read_text()
    # Every point of GRPO's training curve carries the mean response length of its evaluation.
    for curve in (payload["curves"]["grpo"], payload["per_seed"][0]["curves"]["grpo"]):
        assert len(curve) == settings.curve_points + 1
        for point in curve:
            assert 1 <= point["response_length"] <= settings.max_new_tokens
    for point in payload["curves"]["grpo"]:
        assert point["response_length_low"] <= point["response_length"] <= point["response_length_high"]
    assert result.rows[0].pass_at_k  # the Row objects carry the estimates too
