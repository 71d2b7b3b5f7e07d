"""The leaderboard's rows and reports without training anything: per-prompt values, the summary over seeds
with intervals and significance marks, best-of-k's per-prompt values, the budget counters, provenance and
the HTML page (hand-built inputs, hand-computed expectations)."""

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agents.rejection import best_of_k_kl
from rlhf_bench.leaderboard import BenchmarkSettings, CountingReward, EvalResult, SeedRow, summarise
from rlhf_bench.leaderboard.html_report import render_html
from rlhf_bench.leaderboard.provenance import git_state, provenance, versions
from rlhf_bench.leaderboard.rows import seed_row
from rlhf_bench.leaderboard.runner import BenchmarkResult, best_of_k_curve, statistics_description
from rlhf_bench.leaderboard.stats import Resampler
from rlhf_bench.leaderboard.table import ranked


def evaluation(name, gold, proxy=None, kl=None, draws=1):
    """An EvalResult with ``len(gold)`` episodes, ``draws`` per prompt, in (prompt, draw) order."""
    gold = np.asarray(gold, dtype=float)
    n = len(gold)
    return EvalResult(
        name=name,
        prompts=[f"p{i // draws}" for i in range(n)],
        responses=[f"r{i}" for i in range(n)],
        prompt_index=np.arange(n) // draws,
        sample=np.arange(n) % draws,
        proxy=np.asarray(proxy if proxy is not None else gold, dtype=float),
        gold=gold,
        kl=np.asarray(kl if kl is not None else np.zeros(n), dtype=float),
        lengths=np.full(n, 3),
        tokens_per_s=100.0,
        seconds=1.0,
    )


def test_seed_rows_average_draws_and_pair_wins_by_prompt_and_draw():
    sft = evaluation("sft", [0.0, 1.0, 2.0, 3.0], draws=2)
    agent = evaluation("a", [1.0, 1.0, 1.0, 5.0], kl=[0.5, np.nan, 1.0, 2.0], draws=2)
    row = seed_row("a", agent, sft, wall_time_s=2.0, sampled_tokens=100.0)
    np.testing.assert_array_equal(row.values["gold"], [1.0, 3.0])
    np.testing.assert_array_equal(row.values["kl"], [0.5, 1.5])  # a NaN KL is left out of its prompt
    # Prompt 0: beats 0, ties 1 -> 0.75; prompt 1: loses to 2, beats 3 -> 0.5.
    np.testing.assert_array_equal(row.values["win_rate"], [0.75, 0.5])
    base = seed_row("sft", sft, None, wall_time_s=0.0)
    np.testing.assert_array_equal(base.values["win_rate"], [0.5, 0.5])
    with pytest.raises(ValueError, match="same prompts and draws"):
        seed_row("a", evaluation("a", [1.0, 2.0, 3.0]), sft, wall_time_s=0.0)


def test_summary_marks_the_best_and_what_a_paired_test_cannot_tell_from_it():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, size=(2, 50))  # shared by every row: what pairing removes

    def row(name, offset, noise=0.0, **usage):
        values = {
            "gold": difficulty + offset + noise * np.tile([1.0, -1.0], (2, 25)),
            "proxy": np.zeros((2, 50)),
            "kl": np.full((2, 50), offset),
            "win_rate": np.full((2, 50), 0.5),
        }
        return [SeedRow(name, {k: v[i] for k, v in values.items()}, **usage) for i in range(2)]

    best, close, worse = row("best", 1.0), row("close", 0.99, noise=0.3), row("worse", 0.5)
    usage = row("usage", -5.0, sampled_tokens=30.0, reward_calls=4.0, gradient_steps=2.0, wall_time_s=3.0)
    usage[1].sampled_tokens = 50.0
    per_seed = [[best[i], close[i], worse[i], usage[i]] for i in range(2)]
    rows = {r.agent: r for r in summarise(per_seed, Resampler.draw(2, 50, resamples=1000, seed=0))}
    assert rows["best"].best and rows["best"].same_as_best and rows["best"].gap == 0.0
    assert (
        rows["close"].same_as_best
        and not rows["close"].best
        and rows["close"].gap_low < 0 < rows["close"].gap_high
    )
    assert not rows["worse"].same_as_best
    assert rows["worse"].gap == pytest.approx(-0.5) and rows["worse"].gap_high == pytest.approx(-0.5)
    # Each row's own interval is wide (the difficulty spread), the paired difference is not.
    assert rows["worse"].gold_high - rows["worse"].gold_low > 1.0
    assert rows["best"].gold == pytest.approx(difficulty.mean() + 1.0) and rows["best"].seeds == 2
    assert rows["usage"].sampled_tokens == 40.0 and rows["usage"].train_tokens_per_s == pytest.approx(40 / 3)
    assert rows["usage"].gradient_steps == 2.0 and rows["best"].sampled_tokens is None
    assert rows["best"].kl_low == rows["best"].kl_high == 1.0  # constant: zero width
    with pytest.raises(ValueError, match="same rows in the same order"):
        summarise([[best[0], close[0]], [close[1], best[1]]], Resampler.draw(2, 50, resamples=100, seed=0))
    with pytest.raises(ValueError, match="2 seeds of rows for a resampler of shape"):
        summarise(per_seed, Resampler.draw(1, 50, resamples=100, seed=0))


def test_ranking_uses_the_proxy_without_a_gold_rater():
    values = {"gold": np.full(4, np.nan), "proxy": np.array([1.0, 2.0, 3.0, 4.0])}
    values.update(kl=np.zeros(4), win_rate=np.full(4, 0.5))
    low = SeedRow("low", {**values, "proxy": values["proxy"] - 1})
    rows = summarise([[low, SeedRow("high", values)]], Resampler.draw(1, 4, resamples=200, seed=0), "proxy")
    assert [r["agent"] for r in ranked(rows, has_gold=False)] == ["high", "low"]
    assert rows[1].best and math.isnan(rows[1].gold)


def test_best_of_k_per_prompt_values_average_to_the_pooled_estimates():
    rng = np.random.default_rng(1)
    prompts, n = 5, 8
    proxy = rng.normal(size=(prompts, n))
    gold = proxy + rng.normal(scale=0.5, size=(prompts, n))
    samples = evaluation("best-of-k", gold.ravel(), proxy=proxy.ravel(), draws=n)
    samples.kl = np.full(prompts * n, np.nan)
    baseline = evaluation("sft", rng.normal(size=prompts * 2), draws=2)
    points, values = best_of_k_curve(samples, [1, 2, 4, 8], baseline)
    assert [p["k"] for p in points] == [1, 2, 4]  # k = 8 leaves one group: no KL estimate
    for point in points:
        k, v = point["k"], values[point["k"]]
        assert v["kl"].mean() == pytest.approx(best_of_k_kl(proxy, k))
        winners = proxy.reshape(prompts, n // k, k).argmax(axis=2)
        win_gold = np.take_along_axis(gold.reshape(prompts, n // k, k), winners[..., None], 2)[..., 0]
        np.testing.assert_allclose(v["gold"], win_gold.mean(axis=1))
        assert point["gold"] == pytest.approx(win_gold.mean())
        base = baseline.gold.reshape(prompts, 2)[:, np.arange(n // k) % 2]  # group m vs draw m mod 2
        np.testing.assert_allclose(v["win_rate"], ((win_gold > base) + 0.5 * (win_gold == base)).mean(axis=1))


def test_counting_reward_counts_responses_and_passes_scores_through():
    reward = CountingReward(lambda prompts, responses: [float(len(r)) for r in responses])
    assert reward(["a", "b"], ["xx", "yyy"]) == [2.0, 3.0]
    reward(["c"], ["z"])
    assert reward.calls == 3


def test_provenance_reads_versions_git_and_device_locally(tmp_path):
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    state = git_state()
    assert state is not None and state["commit"] == head and isinstance(state["dirty"], bool)
    assert git_state(tmp_path) is None  # not a checkout
    info = versions()
    assert info["python"].count(".") == 2 and info["torch"] and info["transformers"]
    described = provenance(__import__("torch").device("cpu"))
    assert described["device"]["device"] == "cpu" and described["device"]["torch_threads"] >= 1


def test_settings_validate_the_new_fields():
    assert BenchmarkSettings.quick().seeds == 1 and BenchmarkSettings.full().seeds == 3
    assert BenchmarkSettings.quick(seed=4, seeds=3).run_seeds() == [4, 5, 6]
    assert BenchmarkSettings.quick(seeds=3).artifact_key() == BenchmarkSettings.quick().artifact_key()
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        BenchmarkSettings.quick(seeds=0)
    with pytest.raises(ValueError, match="bootstrap_resamples must be >= 100"):
        BenchmarkSettings.quick(bootstrap_resamples=10)
    with pytest.raises(ValueError, match="curve_points and curve_prompts"):
        BenchmarkSettings.quick(curve_points=0)


def test_html_report_escapes_text_and_embeds_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    plot = tmp_path / "efficiency.png"
    fig.savefig(plot)
    plt.close(fig)
    values = {"gold": np.arange(4.0), "proxy": np.zeros(4), "kl": np.zeros(4), "win_rate": np.full(4, 0.5)}
    settings = BenchmarkSettings.tiny()
    rows = summarise([[SeedRow("sft", values)]], Resampler.draw(1, 4, resamples=200, seed=0))
    result = BenchmarkResult(
        rows=rows,
        settings=settings.to_dict(),
        artifacts={},
        samples=[
            {
                "prompt": "review <b>",
                "responses": {"sft": {"text": "<script>x</script>", "gold": 1.0, "proxy": 0.5}},
            }
        ],
        statistics=statistics_description(1, 4, settings, "gold"),
        provenance=provenance(__import__("torch").device("cpu")),
    )
    page = render_html(result, ranked(rows, True), {}, [plot])
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page and "review &lt;b&gt;" in page
    assert page.count('<img src="data:image/png;base64,') == 1
    assert "sft (best)" in page and "1.500 [" in page


def test_settings_validate_the_update_shape():
    assert BenchmarkSettings.quick().update_epochs == 4 and BenchmarkSettings.quick().minibatches == 4
    for bad in (dict(update_epochs=0), dict(minibatches=0), dict(minibatches=3)):  # 3 does not divide 64
        with pytest.raises(ValueError, match="minibatches must divide ppo_episodes"):
            BenchmarkSettings.quick(**bad)


def test_pass_at_1_is_paired_with_the_sft_policys_by_prompt():
    """pass@1 - SFT is the mean of per-prompt differences with a paired interval: a row that is better on
    every prompt by 0.25 has the interval [0.25, 0.25], although its own and SFT's intervals overlap."""
    sft_pass = np.array([0.0, 0.25, 0.5, 0.75])
    rows = []
    for name, passes in (("sft", sft_pass), ("rl", sft_pass + 0.25), ("same", sft_pass)):
        row = SeedRow(name, {m: np.zeros(4) for m in ("gold", "proxy", "kl", "win_rate")})
        row.pass_at_k = {1: passes, 2: np.minimum(1.0, 2 * passes)}
        rows.append(row)
    summary = {
        row.agent: row.as_dict() for row in summarise([rows], Resampler.draw(1, 4, resamples=200, seed=0))
    }
    assert summary["rl"]["pass_at_1_vs_sft"] == pytest.approx(0.25)
    assert summary["rl"]["pass_at_1_vs_sft_low"] == pytest.approx(0.25)
    assert summary["rl"]["pass_at_1_vs_sft_high"] == pytest.approx(0.25)
    assert summary["rl"]["pass_at_1_low"] < summary["sft"]["pass_at_1_high"]  # unpaired intervals overlap
    assert summary["same"]["pass_at_1_vs_sft"] == 0.0 and summary["sft"]["pass_at_1_vs_sft"] == 0.0
    from rlhf_bench.leaderboard.table import columns, csv_fields

    titles = [title for _, title, _ in columns(list(summary.values()))]
    assert titles[titles.index("pass@1") + 1] == "pass@1 - SFT"
    assert "pass_at_1_vs_sft_high" in csv_fields(list(summary.values()))
