"""The task registry and the verifiable sorting task: the checker on hand cases, the seeded generator, the
registry and its cache directories, checker-ranked preferences, the whole tiny benchmark on the task (every
default row), the SFT policy's partial skill on the quick settings, and a user-registered task."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_bench.cli import main
from rlhf_bench.leaderboard import (
    BenchmarkSettings,
    SortingTask,
    build_artifacts,
    register_task,
    registered_tasks,
    run_benchmark,
)
from rlhf_bench.leaderboard.harness import select_agents
from rlhf_bench.leaderboard.sorting import check, solve
from rlhf_bench.leaderboard.tasks import _REGISTRY, get_task, task_directory
from rlhf_bench.leaderboard.verifiable import as_checker, checker_preferences

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# ------------------------------------------------------------------------------------ the checker
@pytest.mark.parametrize(
    ("response", "score"),
    [
        (" b b c d", 1.0),  # sorted
        ("b b c d", 1.0),  # the leading space is only the tokenizer's separator
        (" b c b d", 2 / 4),  # positions 0 and 3 hold the right letter
        (" d c b b", 0.0),  # reversed: no position right
        (" b b c", 3 / 4),  # one letter short
        (" b b c d d", 4 / 5),  # one letter too many
        (" b b c d : sort", 4 / 6),
        (" ", 0.0),
        ("", 0.0),
        (" sort", 0.0),
    ],
)
def test_sorting_checker_by_hand(response, score):
    assert check("sort d b c b :", response) == pytest.approx(score)


def test_sorting_checker_rejects_other_prompts():
    assert solve("sort j a :") == ["a", "j"]
    for prompt in ("sort :", "d b c :", "sort d b c", "sort d x c :", "review of the film night river :"):
        with pytest.raises(ValueError, match="not a sorting prompt"):
            solve(prompt)
    with pytest.raises(ValueError):
        SortingTask().score(["sort a :"], [" a", " a"])  # one response per prompt
    with pytest.raises(ValueError, match="min_letters"):
        SortingTask(min_letters=4, max_letters=3)
    with pytest.raises(ValueError, match="noise"):
        SortingTask(noise=1.5)


def test_sorting_generator_is_seeded_and_demonstrations_are_right_but_for_the_noise():
    task = SortingTask(seed=3)
    assert task.prompts(20, stream=1) == SortingTask(seed=3).prompts(20, stream=1)
    assert task.prompts(20, stream=1) != task.prompts(20, stream=2)
    assert task.prompts(20, stream=1) != SortingTask(seed=4).prompts(20, stream=1)
    prompts = task.prompts(2000, stream=7)
    assert {len(p.split()) - 2 for p in prompts} == {3, 4, 5, 6}
    assert set(" ".join(prompts).split()) <= set(task.vocabulary())
    demos = task.demonstrations(prompts, stream=7)
    assert demos == task.demonstrations(prompts, stream=7) and all(d.startswith(" ") for d in demos)
    copied = np.array([d.split() == p.split()[1:-1] for p, d in zip(prompts, demos)])
    # Three tenths copy the prompt's letters unsorted (the systematic mistake; some are sorted already).
    assert 0.27 < copied.mean() < 0.36
    noisy = SortingTask(seed=3, copy=0.0)
    demos = noisy.demonstrations(prompts, stream=7)
    scores = np.array(noisy.score(prompts, demos))
    lengths = np.array([len(p.split()) - 2 for p in prompts])
    wrong = scores < 1
    # A tenth of the demonstrations (seeded: 188 of 2000) have exactly one wrong letter, the rest are sorted.
    assert 0.08 < wrong.mean() < 0.12
    np.testing.assert_allclose(scores[wrong], (lengths[wrong] - 1) / lengths[wrong])
    clean = SortingTask(seed=3, noise=0.0, copy=0.0)
    assert clean.score(prompts, clean.demonstrations(prompts, stream=7)) == [1.0] * len(prompts)
    with pytest.raises(ValueError, match="copy in"):
        SortingTask(noise=0.8, copy=0.3)


# ------------------------------------------------------------------------------------ the registry
def test_the_built_in_tasks_are_registered_reviews_first():
    tasks = registered_tasks()
    assert list(tasks)[:3] == ["reviews", "guess-number", "sorting"]
    assert "gold rater" in tasks["reviews"].description and "checker" in tasks["sorting"].description
    assert "multi-turn" in tasks["guess-number"].description
    with pytest.raises(
        ValueError, match=r"unknown task 'nope'; registered tasks: \['reviews', 'guess-number', 'sorting'"
    ):
        get_task("nope")
    for name in ("", "my task", "a/b", "a,b"):
        with pytest.raises(ValueError, match="task names"):
            register_task(name)
    with pytest.raises(ValueError, match="version"):
        register_task("fine", version=-1)


def test_each_task_caches_in_its_own_versioned_directory(tmp_path):
    settings = BenchmarkSettings.tiny()
    reviews = task_directory("reviews", settings, tmp_path)
    # The review task's directory is the one it always had: existing caches stay valid.
    assert reviews == tmp_path / "benchmark" / f"reviews-{settings.artifact_key()}"
    sorting = task_directory("sorting", settings, tmp_path)
    assert sorting.parent == reviews.parent and sorting.name.startswith("sorting-")
    assert task_directory("sorting", BenchmarkSettings.tiny(token_budget=7), tmp_path) == sorting
    assert task_directory("sorting", BenchmarkSettings.tiny(sft_pairs=7), tmp_path) != sorting

    @register_task("versioned", version=1)
    def first(settings, **options):
        raise AssertionError("not built here")

    try:
        one = task_directory("versioned", settings, tmp_path)
        register_task("versioned", version=2)(first)
        assert task_directory("versioned", settings, tmp_path) != one  # a new version, a fresh build
    finally:
        _REGISTRY.pop("versioned", None)


def test_unknown_tasks_fail_before_anything_is_built(tmp_path):
    args = [
        "benchmark",
        "--tiny",
        "--task",
        "nope",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(
        ValueError, match=r"unknown task 'nope'; registered tasks: \['reviews', 'guess-number', 'sorting'"
    ):
        main(args)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="--task sorting builds a task's own models"):
        run_benchmark(task="sorting", policy="p", reward_model="r", out_dir=tmp_path, log=lambda _: None)


# ---------------------------------------------------------------------- checker and its preferences
def test_the_checker_validates_what_the_task_returns():
    class Scores:
        def __init__(self, values):
            self.values = values

        def vocabulary(self):
            return ["a"]

        def prompts(self, n, *, stream):
            return ["a"] * n

        def demonstrations(self, prompts, *, stream):
            return [" a"] * len(prompts)

        def score(self, prompts, responses):
            return self.values

    assert as_checker(Scores([0.0, 0.25, 1.0]))(["a"] * 3, [" a"] * 3) == [0.0, 0.25, 1.0]
    with pytest.raises(ValueError, match=r"must score in \[0, 1\], got values from 0.000 to 2.000"):
        as_checker(Scores([0.0, 2.0]))(["a"] * 2, [" a"] * 2)
    with pytest.raises(ValueError, match="returned shape"):
        as_checker(Scores([1.0]))(["a"] * 2, [" a"] * 2)
    with pytest.raises(TypeError, match="is not a VerifiableTask"):
        as_checker(object())


def test_checker_preferences_keep_the_better_answer_and_drop_ties():
    prompts = ["sort b a :", "sort c b a :", "sort a a :"]
    samples = {
        "sort b a :": [" a b", " b a", " a a", " b b"],  # 1 vs 0, then a tie (1/2 each)
        "sort c b a :": [" a c b", " c a b", " a b", " a b c"],  # 1/3 vs 0, then 2/3 vs 1
        "sort a a :": [" a a", " a a", " a", " b"],  # identical answers, then 1/2 vs 0
    }
    pairs, dropped = checker_preferences(
        prompts,
        lambda ps, k: [samples[p][:k] for p in ps],
        SortingTask().score,
        pairs_per_prompt=2,
        seed=0,
    )
    assert dropped == 2  # the tie and the identical pair
    assert [(c.prompt, c.chosen, c.rejected) for c in pairs] == [
        ("sort b a :", " a b", " b a"),
        ("sort c b a :", " a c b", " c a b"),
        ("sort c b a :", " a b c", " a b"),
        ("sort a a :", " a", " b"),
    ]
    assert all(c.gold[0] > c.gold[1] for c in pairs)
    levels = ["significantly_better", "slightly_better", "slightly_better", "better"]  # gaps 1, 1/3, 1/3, 1/2
    assert [c.level for c in pairs] == levels


# ------------------------------------------------------------------------------ end to end, tiny
@pytest.mark.slow
def test_the_tiny_benchmark_runs_every_default_row_on_the_sorting_task(tmp_path, capsys):
    code = main(
        [
            "benchmark",
            "--tiny",
            "--task",
            "sorting",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "cached the SFT policy and preference data" in printed and "ranked" in printed
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "benchmark").iterdir()] == ["sorting"]
    payload = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert payload["task"] == "sorting" and payload["verifiable"] is True
    rows = {row["agent"]: row for row in payload["leaderboard"]}
    expected = [name for name in select_agents(None) if name != "best-of-k"] + ["best-of-2"]
    assert set(expected) <= set(rows), (expected, list(rows))
    assert not any(name.startswith("ppo-beta") for name in rows)  # rlvr_settings: no proxy gap to sweep for
    for row in rows.values():  # the checker is reward and gold: the two columns agree
        assert row["gold"] == pytest.approx(row["proxy"]) and 0.0 <= row["gold"] <= 1.0
        assert math.isfinite(row["win_rate"])
    assert rows["random"]["gold"] < rows["sft"]["gold"]
    assert payload["artifacts"]["preference_pairs"] > 0 and "sft_solved" in payload["artifacts"]
    assert not payload["reward_models"]  # no reward model was trained
    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "Task `sorting`" in markdown and "no proxy gap" in markdown
    # Offline DPO trained on the checker-ranked pairs of SFT samples (its history has a loss per step).
    assert payload["histories"]["dpo"], payload["histories"].keys()
    pairs = (tmp_path / "cache" / "benchmark").iterdir().__next__() / "preferences.jsonl"
    assert len(pairs.read_text().splitlines()) == payload["artifacts"]["preference_pairs"]


@pytest.mark.slow
def test_nproc_workers_rebuild_the_context_of_the_chosen_task(tmp_path):
    """``--nproc`` workers load the task's artifacts themselves: they must get the sorting task's, not the
    default review task's (which they would build into the cache next to it)."""
    result = run_benchmark(
        BenchmarkSettings.tiny(sweep_kl_coefs=()),
        task="sorting",
        agents=["ppo"],
        device="cpu",
        out_dir=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        progress=False,
        log=lambda _: None,
        nproc=2,
    )
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "benchmark").iterdir()] == ["sorting"]
    ppo = {row.agent: row for row in result.rows}["ppo"]
    # Trained by the workers: a policy other than SFT's (whose KL to itself is exactly 0; the k1 estimate of
    # a policy that moved little may have either sign on 16 prompts), scored by the checker (gold == proxy).
    assert math.isfinite(ppo.kl) and ppo.kl != 0 and result.records["ppo"]["history"]
    assert ppo.gold == pytest.approx(ppo.proxy)


# ------------------------------------------------------------------------- the SFT policy, quick
@pytest.mark.slow
def test_the_sft_policy_learns_to_sort_partly_on_the_quick_settings(tmp_path):
    """The quick settings' SFT policy sorts well above chance but far from always: RL has room. Measured
    (version 2, three tenths of the demonstrations copied unsorted) for seed 0: 0.177 sorted exactly (600
    samples at temperature 1), mean checker score 0.573, 2305 checker-ranked pairs; version 1 (slips only):
    0.517, 0.563, 0.615 for seeds 0, 1, 2. Deterministic on CPU."""
    metrics = build_artifacts(
        BenchmarkSettings.quick(), task="sorting", cache_dir=tmp_path, progress=False, log=lambda _: None
    ).metrics
    assert 0.1 < metrics["sft_solved"] < 0.9, metrics
    assert metrics["sft_solved"] < metrics["sft_score"] < 0.95, metrics
    assert metrics["preference_pairs"] > 1000, metrics


# ------------------------------------------------------------------------------ a user's own task
def load_example(name: str):
    """Import ``examples/<name>.py`` (a script, not a package), as ``sys.modules[name]``: its dataclasses
    resolve their string annotations through the module they are defined in."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rhymes():
    module = load_example("custom_task")
    yield module
    _REGISTRY.pop("rhymes", None)
    sys.modules.pop("custom_task", None)


def test_the_example_task_checker_by_hand(rhymes):
    task = rhymes.RhymeTask(seed=0)
    prompts = task.prompts(50, stream=1)
    assert prompts == rhymes.RhymeTask(seed=0).prompts(50, stream=1)
    assert task.score(["a word that rhymes with cat :"] * 5, [" hat", " cat", " king", " hat hat", ""]) == [
        1.0,
        0.0,  # the word itself does not count
        0.0,
        0.0,
        0.0,
    ]
    assert "rhymes" in registered_tasks()


@pytest.mark.slow
def test_a_user_registered_task_runs_in_the_benchmark(rhymes, tmp_path):
    result = rhymes.main(["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert result.task == "rhymes" and result.verifiable
    assert [row.agent for row in result.rows] == ["sft", "grpo", "dpo"]
    assert all(0.0 <= row.gold <= 1.0 and row.gold == row.proxy for row in result.rows)
    assert (tmp_path / "cache" / "benchmark").iterdir().__next__().name.startswith("rhymes-")


def test_a_task_brings_its_own_settings_and_they_are_recorded():
    from rlhf_bench.leaderboard.tasks import task_settings

    quick = BenchmarkSettings.quick()
    tuned, changed = task_settings("sorting", quick)
    assert (tuned.update_epochs, tuned.minibatches) == (1, 1)
    assert tuned.token_budget == 5 * quick.token_budget and tuned.train_prompts == 8 * quick.train_prompts
    assert changed["update_epochs"] == {"preset": 4, "task": 1}
    assert set(changed) == {
        "update_epochs",
        "minibatches",
        "ppo_lr",
        "token_budget",
        "train_prompts",
        "sweep_kl_coefs",
    }
    assert changed["sweep_kl_coefs"] == {"preset": (0.002,), "task": ()}
    assert tuned.artifact_key() == quick.artifact_key()  # the cached SFT policy is the preset's
    assert task_settings("reviews", quick) == (quick, {})
    # Relative to the preset: the full run keeps its larger budget, times five.
    assert task_settings("sorting", BenchmarkSettings.full())[0].token_budget == 5 * 36_000


def test_task_settings_may_not_touch_the_artifacts():
    import dataclasses

    from rlhf_bench.leaderboard.tasks import task_settings

    try:
        register_task("bad-settings", settings=lambda s: dataclasses.replace(s, sft_pairs=10))(
            lambda s, **o: None
        )
        with pytest.raises(ValueError, match=r"artifact fields \['sft_pairs'\]"):
            task_settings("bad-settings", BenchmarkSettings.quick())
        register_task("odd-settings", settings=lambda s: {"token_budget": 1})(lambda s, **o: None)
        with pytest.raises(TypeError, match="must return BenchmarkSettings"):
            task_settings("odd-settings", BenchmarkSettings.quick())
        with pytest.raises(TypeError, match="settings must be a function"):
            register_task("not-callable", settings={"token_budget": 1})
    finally:
        for name in ("bad-settings", "odd-settings"):
            _REGISTRY.pop(name, None)
