"""The three floors: ``llm_env`` at the bottom, ``agents`` and ``rewards`` beside each other on it, ``rlhf_bench``
on top; no import runs back up and no import cycle exists (see ARCHITECTURE.md)."""

import subprocess
import sys
import textwrap

from rlhf_bench.import_graph import cycles, import_graph, layering_violations, render


def test_no_package_imports_a_floor_above_its_own_and_there_is_no_cycle():
    graph = import_graph()
    assert {"llm_env.envs", "agents.ppo", "rewards.model", "rlhf_bench.leaderboard.runner"} <= set(graph)
    assert layering_violations(graph) == []
    assert cycles(graph) == []
    assert "floor 0: llm_env" in render(graph)


def test_the_checker_finds_violations_and_cycles(tmp_path):
    def write(path, text):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))

    for package in ("llm_env", "agents", "rewards", "rlhf_bench"):
        write(f"{package}/__init__.py", "")
    write("llm_env/a.py", "def f():\n    from agents import b  # a lazy import still counts\n")
    write("agents/b.py", "from rewards.c import x\n")
    write(
        "rewards/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlhf_bench import d\n"
    )
    write("rlhf_bench/d.py", "from . import e\n")
    write("rlhf_bench/e.py", "import rlhf_bench.d\n")
    graph = import_graph(tmp_path)
    assert graph["llm_env.a"] == {"agents.b"} and graph["rewards.c"] == set()  # TYPE_CHECKING is skipped
    assert sorted(layering_violations(graph)) == [("agents.b", "rewards.c"), ("llm_env.a", "agents.b")]
    assert cycles(graph) == [["rlhf_bench.d", "rlhf_bench.e"]]


def test_importing_the_environment_loads_neither_agents_nor_rewards():
    code = "import sys, llm_env; print(sorted(m for m in ('agents', 'rewards', 'rlhf_bench') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
