"""The leaderboard rendered from ``leaderboard.json`` alone (:func:`leaderboard_markdown`, what the
documentation's results pages use) is the run's own ``leaderboard.md``: the table and caption, the pass@k
table and every seed's table, from the full payload and from the trimmed copy the documentation keeps."""

import importlib.util
import json
from pathlib import Path

import pytest

from rlhf_bench.leaderboard import BenchmarkSettings, run_benchmark
from rlhf_bench.leaderboard.report import leaderboard_markdown

RESULTS_PAGES = Path(__file__).resolve().parents[2] / "docs" / "_ext" / "results_pages.py"


def results_pages():
    spec = importlib.util.spec_from_file_location("results_pages", RESULTS_PAGES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_markdown_rendered_from_leaderboard_json_is_the_runs_leaderboard_md(tmp_path):
    """A tiny sorting run with two seeds (verifiable: pass@k; two seeds: the per-seed tables)."""
    settings = BenchmarkSettings.tiny(seeds=2, sweep_kl_coefs=())
    run_benchmark(
        settings,
        task="sorting",
        agents=["grpo", "random"],
        device="cpu",
        cache_dir=tmp_path / "cache",
        out_dir=tmp_path / "out",
        progress=False,
        log=lambda _: None,
    )
    written = (tmp_path / "out" / "leaderboard.md").read_text()
    payload = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    table, caption, *_ = leaderboard_markdown(payload).split("\n\n")
    assert f"\n\n{table}\n\n{caption}\n\n" in written
    assert "| pass@1 | pass@1 - SFT |" in table and "Means over 2 seeds (0, 1)" in caption
    rendered = leaderboard_markdown(payload, per_seed=True)
    pass_at_k, _, seeds = rendered.partition("\n\n## Every seed")
    pass_at_k = pass_at_k.partition(caption)[2]
    assert pass_at_k.startswith("\n\npass@k, unbiased estimate") and pass_at_k in written
    assert seeds.count("### Seed ") == 2 and f"## Every seed{seeds}" in written
    # The trimmed copy kept in docs/results/data renders the same, at a fraction of the size.
    trimmed = results_pages().trim_payload(payload)
    assert leaderboard_markdown(trimmed, per_seed=True) == rendered
    assert not {"samples", "histories"} & set(trimmed)
    assert all(set(run) <= {"seed", "leaderboard", "best_of_k", "budgets"} for run in trimmed["per_seed"])
    assert len(json.dumps(trimmed)) < len(json.dumps(payload)) / 2
    assert trimmed["provenance"] == payload["provenance"]
