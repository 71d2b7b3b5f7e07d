"""The benchmark: the review task and its gold rater, the Gao et al. fits, and the whole pipeline end to end
on a reduced setting (every stage runs, the cache is reused, the reports are written and well formed)."""

import base64
import csv
import itertools
import json
import math
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.losses import LEVELS
from rlhf_bench.cli import main
from rlhf_bench.leaderboard import (
    BenchmarkContext,
    BenchmarkSettings,
    ReviewTask,
    register_agent,
    run_benchmark,
)
from rlhf_bench.leaderboard.builtin_agents import RandomAgent
from rlhf_bench.leaderboard.harness import _REGISTRY, select_agents
from rlhf_bench.leaderboard.report import fit_best_of_n, fit_rl, format_table

PNG = b"\x89PNG\r\n\x1a\n"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def not_json(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def git_head() -> str:
    return subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


class StrictHTML(HTMLParser):
    """Well-formedness by ``html.parser``: every non-void tag closed in order, the images collected."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (
            f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        )
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_report_html(path: Path, plots: list[Path], agents: list[str]) -> None:
    """report.html parses as well-formed HTML, embeds every plot byte for byte, and references nothing
    outside itself (no scripts, no stylesheets, no remote sources)."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], parser.stack
    assert {"html", "head", "body", "table", "style", "img"} <= parser.tags
    assert not {"script", "link", "iframe", "object"} & parser.tags
    assert 'src="http' not in text and "href=" not in text and "url(" not in text
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in parser.images]
    assert all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert embedded == [plot.read_bytes() for plot in plots]
    content = "".join(parser.text)
    for section in ("Leaderboard", "Samples", "Settings", "Versions", "95% intervals"):
        assert section in content, section
    for agent in agents:
        assert agent in content, agent


def test_task_is_seeded_and_the_gold_rater_prefers_good_reviews():
    task = ReviewTask(seed=3)
    assert task.prompts(5, stream=1) == ReviewTask(seed=3).prompts(5, stream=1)
    assert task.prompts(5, stream=1) != task.prompts(5, stream=2)
    prompt, kids = "review of the film night river :", "[kids] review of the film night river :"
    fluent = " the plot was excellent . the acting was great . i found the music wonderful ."
    superlatives = " excellent excellent great great wonderful wonderful excellent great ."
    negative = " the plot was awful . the acting was bad ."
    off_topic = " the battery was excellent . the screen was great ."
    assert task.helpfulness(prompt, fluent) > task.helpfulness(prompt, negative)
    assert (
        task.helpfulness(prompt, fluent) > task.helpfulness(prompt, superlatives) + 2
    )  # the proxy's blind spot
    assert task.helpfulness(prompt, fluent) > task.helpfulness(prompt, off_topic)
    assert task.helpfulness(prompt, fluent) > task.helpfulness(prompt, fluent.rstrip(" ."))  # unfinished
    unsafe = fluent + " some scenes were gory ."
    assert task.safety(prompt, unsafe) == 0.0 and task.safety(kids, unsafe) == -1.5
    assert task.gold([kids], [unsafe])[0] < task.gold([prompt], [unsafe])[0]
    # Generated reviews are grammatical by construction: full fluency credit.
    reviews = task.reviews(task.prompts(50, stream=9), stream=9)
    assert all(r.startswith(" ") and r.endswith(".") for r in reviews)
    assert set(" ".join(reviews).split()) <= set(task.vocabulary())


def test_gao_fits_recover_their_parameters():
    d = np.linspace(0.1, 3, 12)
    assert fit_best_of_n(d, d * (1.5 - 0.4 * d)) == pytest.approx((1.5, 0.4))
    assert fit_rl(d, d * (0.8 - 0.3 * np.log(d))) == pytest.approx((0.8, 0.3))


def test_table_formatting():
    rows = [
        {
            "agent": "a",
            "gold": 1.0,
            "gold_low": 0.9,
            "gold_high": 1.25,
            "proxy": None,
            "kl": 0.5,
            "win_rate": 0.7,
            "tokens_per_s": 10.0,
            "wall_time_s": 2.0,
            "sampled_tokens": 36012.0,
            "best": True,
            "same_as_best": True,
        },
        {"agent": "b", "gold": 0.95, "same_as_best": True},
        {"agent": "c", "gold": 0.2, "gold_low": 0.1, "gold_high": None},
    ]
    text = format_table(rows)
    lines = text.split("\n")
    assert "gold win-rate vs SFT" in text and " - " in lines[2] + " "
    assert lines[2].startswith("a (best)") and "1.000 [0.900, 1.250]" in lines[2] and "36,012" in lines[2]
    assert lines[3].startswith("b †") and lines[4].startswith("c ") and "0.200 " in lines[4] + " "
    assert format_table(rows, markdown=True).startswith("| agent |")


@pytest.fixture
def custom_entry():
    @register_agent("always-random", description="a user-registered entry")
    def factory(ctx: BenchmarkContext):
        ctx.record("always-random", history=[])
        return RandomAgent(len(ctx.tokenizer), seed=1)

    yield "always-random"
    _REGISTRY.pop("always-random", None)


@pytest.mark.slow
def test_quick_pipeline_end_to_end_on_a_reduced_setting(tmp_path, custom_entry):
    logs: list[str] = []
    settings = BenchmarkSettings.tiny()
    result = run_benchmark(
        settings,
        agents=["all"],
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        progress=False,
        log=logs.append,
    )
    names = [row.agent for row in result.rows]
    budgeted = ["ppo", "ppo-beta-0.002", "grpo", "grpo-kl-loss", "rloo"]
    budgeted += ["dr-grpo", "dapo", "gspo", "reinforce-pp", "remax"]
    for expected in (
        "sft",
        "best-of-2",
        "random",
        "rejection-sampling",
        "rs-then-ppo",
        "sb3-ppo",
        "dpo",
        "online-dpo",
        *budgeted,
    ):
        assert expected in names, (expected, names)
    assert "always-random" in names
    assert any(line.startswith("cached the SFT policy") for line in logs)
    out = tmp_path / "out"
    payload = json.loads((out / "leaderboard.json").read_text(), parse_constant=not_json)  # strict JSON
    rows = {row["agent"]: row for row in payload["leaderboard"]}
    for row in rows.values():
        assert 0.0 <= row["win_rate"] <= 1.0 and row["wall_time_s"] >= 0 and row["tokens_per_s"] > 0
        assert math.isfinite(row["gold"]) and math.isfinite(row["proxy"])
    assert rows["sft"]["win_rate"] == 0.5 and abs(rows["sft"]["kl"]) < 1e-3  # the SFT policy is the reference
    assert rows["random"]["kl"] > rows["ppo"]["kl"]
    assert payload["best_of_k"][0]["k"] == 1 and payload["best_of_k"][-1]["kl_theory"] > 0
    assert {"rm_helpfulness", "rm_safety"} <= set(payload["reward_models"])
    # Every agent with a token budget is evaluated before training and after crossing 1/2 and all of it.
    for name in [*budgeted, "online-dpo"]:
        curve = payload["curves"][name]
        assert [point["fraction"] for point in curve] == [0.0, 0.5, 1.0], name
        assert curve[0]["sampled_tokens"] == 0 and curve[-1]["sampled_tokens"] >= settings.token_budget
        assert curve[-1]["update"] == len(payload["histories"][name]), name
        assert all(point["gold_low"] <= point["gold"] <= point["gold_high"] for point in curve), name
        assert "per_prompt" not in payload["per_seed"][0]["curves"][name][0]  # summarised, not dumped
    for (
        name
    ) in budgeted:  # every policy optimiser stopped at the same token budget, and says how many it used
        budget = payload["budgets"][name]
        assert budget["token_budget"] == settings.token_budget <= budget["sampled_tokens"], (name, budget)
        assert (
            budget["sampled_tokens"]
            < settings.token_budget + 3 * settings.ppo_episodes * settings.max_new_tokens
        )
        assert payload["histories"][name][-1]["sampled_tokens"] == budget["sampled_tokens"]
        assert f"{budget['sampled_tokens']:,} response tokens sampled" in rows[name]["note"]
        assert rows[name]["sampled_tokens"] == budget["sampled_tokens"]
        assert rows[name]["gradient_steps"] == payload["histories"][name][-1]["optimizer_steps"]
    # What the rows consumed: PPO takes 4 epochs x 4 minibatches per update and the proxy scores every
    # episode of its rollouts (not its evaluations); SB3 samples one token per step.
    updates = len(payload["histories"]["ppo"])
    assert rows["ppo"]["gradient_steps"] == 16 * updates
    assert rows["ppo"]["reward_calls"] == settings.ppo_episodes * updates
    assert rows["grpo"]["reward_calls"] == settings.ppo_episodes * len(payload["histories"]["grpo"])
    assert rows["sb3-ppo"]["sampled_tokens"] == max(settings.sb3_timesteps, 512)
    assert 0 < rows["sb3-ppo"]["reward_calls"] <= rows["sb3-ppo"]["sampled_tokens"]
    rs = payload["histories"]["rejection-sampling"][-1]
    assert rows["rejection-sampling"]["sampled_tokens"] == rs["sampled_tokens"] > 0
    assert rows["rejection-sampling"]["reward_calls"] == settings.rs_prompts * settings.rs_k * 2  # + KL draws
    for name in ("sft", "random", "dpo"):
        assert rows[name]["sampled_tokens"] == 0 and rows[name]["reward_calls"] == 0, name
    assert rows["dpo"]["gradient_steps"] > 0 and rows["sft"]["gradient_steps"] == 0
    assert rows["best-of-2"]["reward_calls"] == 2 * settings.eval_prompts * settings.eval_samples
    # Intervals and marks: the best row, and which rows its paired test cannot tell apart from it.
    for row in rows.values():
        for metric in ("gold", "proxy", "win_rate"):
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"], (row["agent"], metric)
    assert [row["agent"] for row in payload["leaderboard"] if row["best"]] == [
        payload["leaderboard"][0]["agent"]
    ]
    for row in rows.values():
        assert row["same_as_best"] == (row["best"] or row["gap_low"] <= 0 <= row["gap_high"])
    assert rows["sft"]["win_rate_low"] == rows["sft"]["win_rate_high"] == 0.5
    assert payload["statistics"]["resamples"] == settings.bootstrap_resamples
    assert "evaluation-prompt sampling only" in payload["statistics"]["covers"]
    provenance = payload["provenance"]
    assert provenance["versions"]["torch"] == torch.__version__ and provenance["versions"]["python"]
    assert provenance["git"]["commit"] == git_head() and provenance["device"]["device"] == "cpu"
    assert payload["settings"]["seed"] == 0 and payload["seeds"] == [0]
    assert payload["histories"]["grpo-kl-loss"][-1]["kl_loss"] >= 0
    # DPO trains on both preference files the reward models learn from; online DPO spends the token budget.
    dpo = result.records["dpo"]
    assert dpo["data"] == ["preferences_helpfulness.jsonl", "preferences_safety.jsonl"]
    assert dpo["pairs"] > 100 and len(dpo["history"]) == -(-dpo["pairs"] // settings.dpo_batch_size)
    assert "preference data" in rows["dpo"]["note"]
    online = result.records["online-dpo"]
    assert online["sampled_tokens"] >= settings.token_budget
    assert (
        online["history"][-2]["sampled_tokens"] < settings.token_budget
    )  # it stops once the budget is spent
    with open(out / "leaderboard.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["agent"] for r in csv_rows] == [r["agent"] for r in payload["leaderboard"]]
    assert {"gold_low", "gold_high", "sampled_tokens", "reward_calls", "gradient_steps"} <= set(csv_rows[0])
    markdown = (out / "leaderboard.md").read_text()
    assert "| agent | gold score |" in markdown and "always-random" in markdown
    assert f"reach {settings.token_budget:,} sampled response tokens" in markdown
    assert "95% intervals, percentile bootstrap over the 16 held-out prompts (500 resamples" in markdown
    assert "## `" in (out / "samples.md").read_text()
    plots = (
        "overoptimization.png",
        "efficiency.png",
        "training.png",
        "reward_models.png",
        "response_length.png",
    )
    assert "pass@1" not in markdown and not payload["pass_at_k"] and not (out / "pass_at_k.png").exists()
    for plot in plots:
        assert (out / plot).read_bytes()[:8] == PNG
    check_report_html(out / "report.html", [out / plot for plot in plots], names)
    assert (
        "<p>Task reviews. Every agent trains against the proxy reward models"
        in (out / "report.html").read_text()
    )

    # A second run reuses the cached SFT policy and reward models.
    logs.clear()
    again = run_benchmark(
        settings,
        agents=["sft", "random"],
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out2",
        progress=False,
        log=logs.append,
    )
    assert any(line.startswith("reusing the cached") for line in logs)
    assert [r.agent for r in again.rows] == ["sft", "random"]
    assert again.rows[0].gold == pytest.approx(result.rows[0].gold)  # same seed, same evaluation


TIMING = ("per_s", "seconds", "wall_time")


def without_timings(value):
    """``value`` without wall times, throughputs and provenance: what must repeat exactly."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if k != "provenance" and not any(t in k for t in TIMING)
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.mark.slow
def test_the_same_seeds_reproduce_the_same_numbers_and_seeds_are_summarised(tiny_cache, tmp_path):
    """The tiny configuration with two seeds, run twice: every number of leaderboard.json repeats exactly
    (wall times and throughputs aside); the summary row is the mean of the seeds' rows, the seeds differ,
    and the intervals say they cover training randomness."""
    settings = BenchmarkSettings.tiny(seeds=2)
    agents = ["ppo", "grpo", "online-dpo", "rejection-sampling", "dpo", "random", "best-of-k"]

    def run(out: str):
        run_benchmark(
            settings,
            agents=agents,
            cache_dir=tiny_cache[0],
            out_dir=tmp_path / out,
            progress=False,
            log=lambda _: None,
        )
        return json.loads((tmp_path / out / "leaderboard.json").read_text())

    first, second = run("a"), run("b")
    assert without_timings(first) == without_timings(second)
    assert first["provenance"]["versions"] == second["provenance"]["versions"]
    assert first["seeds"] == [0, 1] and [run["seed"] for run in first["per_seed"]] == [0, 1]
    assert "training randomness" in first["statistics"]["covers"]
    rows = {row["agent"]: row for row in first["leaderboard"]}
    seeds = [{row["agent"]: row for row in run["leaderboard"]} for run in first["per_seed"]]
    for name, row in rows.items():
        assert row["seeds"] == 2
        for metric in ("gold", "proxy", "win_rate"):  # same prompts on every seed: the mean of the means
            assert row[metric] == pytest.approx(np.mean([seed[name][metric] for seed in seeds])), (
                name,
                metric,
            )
    assert seeds[0]["ppo"]["gold"] != seeds[1]["ppo"]["gold"]  # independent training and sampling
    assert seeds[0]["sft"]["gold"] != seeds[1]["sft"]["gold"]  # independent evaluation sampling
    assert rows["ppo"]["sampled_tokens"] == np.mean([seed["ppo"]["sampled_tokens"] for seed in seeds])
    assert len(first["curves"]["ppo"]) == settings.curve_points + 1
    assert first["curves"]["ppo"][-1]["sampled_tokens"] == pytest.approx(
        np.mean([run["curves"]["ppo"][-1]["sampled_tokens"] for run in first["per_seed"]])
    )


def test_default_and_all_selections(custom_entry):
    default = select_agents(None)
    assert {"sft", "ppo", "grpo", "rloo", "rejection-sampling", "sb3-ppo", "dpo", "best-of-k"} <= set(default)
    assert "always-random" in default  # entries are default unless registered with default=False
    extra = {"grpo-kl-loss", "rs-then-ppo", "dr-grpo", "dapo", "gspo", "reinforce-pp", "remax"}
    assert not extra & set(default)
    everything = select_agents(["all"])
    assert extra <= set(everything) and set(default) <= set(everything)
    assert select_agents(["sft", "default", "gspo"]) == [*default, "gspo"]  # duplicates dropped, order kept
    assert select_agents(["ppo", "ppo"]) == ["ppo"]
    with pytest.raises(ValueError, match="unknown agents"):
        select_agents(["grpo", "nope"])
    with pytest.raises(ValueError, match="not one of"):
        register_agent("all")


def test_bring_your_own_models_without_gold(tmp_path, saved_gpt2, saved_classifier, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n"
            for p in ["the film was", "a great movie", "i liked the", "this book is"] * 3
        )
    )
    result = run_benchmark(
        BenchmarkSettings.tiny(eval_prompts=4),
        agents=["sft", "random"],
        policy=str(saved_gpt2),
        reward_model=str(saved_classifier),
        prompts=str(prompts),
        out_dir=tmp_path / "out",
        progress=False,
        log=lambda _: None,
    )
    assert not result.has_gold
    assert all(math.isnan(row.gold) for row in result.rows)
    assert all(math.isfinite(row.proxy) for row in result.rows)
    with pytest.raises(ValueError, match="bring both"):
        run_benchmark(
            BenchmarkSettings.tiny(), policy=str(saved_gpt2), out_dir=tmp_path / "x", log=lambda _: None
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rm_helpfulness", "rm_safety"])
def test_reward_model_accuracy_rises_with_the_preference_level(tiny_cache, name):
    """Both proxy reward models of the tiny configuration rank the strongest preferences best: Llama 2's
    sanity check of a reward model, and what fails first when reward-model training stalls (it sits near
    chance on every level) or the annotator's levels stop matching the gold gaps."""
    metrics = tiny_cache[1][name]
    accuracy = [metrics["per_level"][level]["accuracy"] for level in LEVELS]  # strongest level first
    for stronger, weaker in itertools.pairwise(accuracy):
        assert stronger >= weaker - 0.05, (name, accuracy)  # slack for levels of a few dozen pairs
    assert accuracy[0] >= accuracy[-1] + 0.25, (name, accuracy)
    assert metrics["accuracy"] > 0.6, (name, metrics["accuracy"])


@pytest.mark.slow
def test_cli_runs_the_benchmark(tiny_cache, tmp_path, capsys):
    code = main(
        [
            "benchmark",
            "--tiny",
            "--agents",
            "sft,random",
            "--cache-dir",
            str(tiny_cache[0]),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "gold win-rate vs SFT" in printed and "benchmark finished" in printed
    with pytest.raises(ValueError, match="unknown agents"):
        main(
            [
                "benchmark",
                "--tiny",
                "--agents",
                "nope",
                "--cache-dir",
                str(tiny_cache[0]),
                "--out",
                str(tmp_path / "o"),
            ]
        )


def test_settings_key_changes_with_artifact_fields_only():
    base = BenchmarkSettings.quick()
    assert base.artifact_key() == BenchmarkSettings.quick(token_budget=99).artifact_key()
    assert base.artifact_key() != BenchmarkSettings.quick(rm_epochs=5).artifact_key()
    assert torch.is_tensor(torch.zeros(1))
