"""Every Python block of the README and of the documentation pages runs.

The blocks of one page run in order in one namespace, like the cells of a notebook, in a fresh temporary
working directory, with one torch thread and the Hugging Face hub switched off: a page is one test, named
by its path. A block that cannot run offline in a few seconds (a hub name, CUDA, torchrun, a long run) is
marked on the line immediately before its fence with the reason::

    <!-- docs-test: skip (downloads Qwen/Qwen2.5-0.5B-Instruct from the hub) -->

A marker without a reason, or one that is not followed by a Python fence, fails
``test_skip_markers_are_well_formed``, so the markers cannot rot either. The blocks run in this process
(importing torch and transformers once per page would cost more than the pages themselves); each page gets
its own module namespace, seeds, working directory and environment variables.
"""

from __future__ import annotations

import gc
import importlib
import random
import re
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PYTHON = {"python", "py", "python3"}
# MyST code directives that hold Python to run: ```{code-block} python, ```{code} py, ...
DIRECTIVES = {"{code-block}", "{code}", "{code-cell}", "{sourcecode}"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>.*\S.*)\)\s*-->\s*$")


@dataclass
class Block:
    """A Python block: its first line in the file (1-based) and its source."""

    line: int
    source: str
    skip: str | None = None  # the reason, when marked


@dataclass
class Page:
    path: Path
    blocks: list[Block] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed or dangling skip markers


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/, build output and _-folders (_build, _static) excluded."""
    found = [ROOT / "README.md"]
    for path in sorted((ROOT / "docs").rglob("*.md")):
        parts = path.relative_to(ROOT / "docs").parts[:-1]
        if not any(part.startswith(("_", ".")) for part in parts):
            found.append(path)
    return [path for path in found if path.is_file()]


def is_python(info: str) -> bool:
    words = info.strip().split()
    if not words:
        return False
    if words[0].lower() in PYTHON:
        return True
    return words[0] in DIRECTIVES and len(words) > 1 and words[1].lower() in PYTHON


def directive_body(lines: list[str]) -> list[str]:
    """A MyST directive's body without its options (``:linenos:`` lines or a ``---`` YAML block)."""
    if lines and lines[0].strip() == "---":
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), 0)
        return [""] * (end + 1) + lines[end + 1 :]
    count = 0
    while count < len(lines) and re.match(r"^\s*:[\w-]+:", lines[count]):
        count += 1
    return [""] * count + lines[count:]


def dedent(line: str, indent: int) -> str:
    """``line`` without the opening fence's indentation (a line indented less loses what it has)."""
    return line[indent:] if line[:indent].strip() == "" else line.lstrip()


def parse(text: str, path: Path) -> Page:
    """The Python blocks of a Markdown text and the problems of its skip markers.

    Fences are CommonMark's: ``` or ~~~, closed by the same character at least as long; blocks nested in a
    longer fence (a ````markdown example) are not blocks. Indented fences (in list items) are dedented.
    """
    page = Page(path)
    lines = text.splitlines()
    marker: tuple[int, str | None] | None = None  # (line, reason or None when malformed)
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if marker is not None and not (opening and is_python(opening["info"])):
            page.errors.append(f"{path}:{marker[0]}: a docs-test marker must be followed by a Python fence")
            marker = None
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            if line.lstrip().startswith("<!--") and "docs-test" in line:
                match = MARKER.match(line)
                if match is None:
                    page.errors.append(
                        f"{path}:{i + 1}: malformed marker {line.strip()!r}; "
                        "write <!-- docs-test: skip (REASON) -->"
                    )
                marker = (i + 1, match["reason"].strip() if match else None)
            i += 1
            continue
        indent, fence, info = len(opening["indent"]), opening["fence"], opening["info"]
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if is_python(info):
            body = [dedent(text_line, indent) for text_line in lines[i + 1 : end]]
            if info.strip().split()[0] in DIRECTIVES:
                body = directive_body(body)
            reason = None
            if marker is not None:
                reason = marker[1] if marker[1] is not None else "malformed marker"
            page.blocks.append(Block(i + 2, "\n".join(body) + "\n", reason))
        marker = None
        i = end + 1
    if marker is not None:
        page.errors.append(f"{path}:{marker[0]}: a docs-test marker must be followed by a Python fence")
    return page


def load(path: Path) -> Page:
    return parse(path.read_text(encoding="utf-8"), path.relative_to(ROOT))


# Registries a page may add to (gym.register, register_agent, register_task): restored after each page, so
# that an agent registered on one page does not run in another page's benchmark.
REGISTRIES = [
    ("gymnasium.envs.registration", "registry"),
    ("rlhf_bench.leaderboard.harness", "_REGISTRY"),
    ("rlhf_bench.leaderboard.tasks", "_REGISTRY"),
    ("llm_env.kl", "KL_ESTIMATORS"),
]


def snapshot_registries() -> list[tuple[dict, dict]]:
    modules = [importlib.import_module(module) for module, _ in REGISTRIES]  # all imported (registering)
    registries = [getattr(module, name) for module, (_, name) in zip(modules, REGISTRIES)]
    return [(registry, dict(registry)) for registry in registries]  # before any is copied


def restore_registries(saved: list[tuple[dict, dict]]) -> None:
    for registry, entries in saved:
        registry.clear()
        registry.update(entries)


PAGES = [load(path) for path in pages()]
RUNNABLE = [page for page in PAGES if page.blocks]


def test_the_collector_finds_python_blocks():
    """The test below cannot pass vacuously: the README and the pages have Python blocks to run."""
    assert sum(len(page.blocks) for page in PAGES) > 0
    assert any(page.path.name == "README.md" for page in RUNNABLE)


def test_skip_markers_are_well_formed():
    errors = [error for page in PAGES for error in page.errors]
    assert not errors, "\n".join(errors)


def test_the_parser():
    text = "\n".join(
        [
            "```python",  # line 1
            "x = 1",
            "```",
            "<!-- docs-test: skip (needs a GPU) -->",
            "```py",  # line 5
            "y = 2",
            "```",
            "````markdown",
            "```python",
            "not a block",
            "```",
            "````",
            "- item",
            "",
            "  ```python",  # line 15, in a list item
            "  if x:",
            "      z = 3",
            "  ```",
            "```{code-block} python",
            ":linenos:",
            "w = 4",
            "```",
            "<!-- docs-test: skip -->",
            "```python",
            "```",
            "<!-- docs-test: skip (dangling) -->",
            "",
            "```bash",
            "ls",
            "```",
        ]
    )
    page = parse(text, Path("page.md"))
    assert [(block.line, block.skip) for block in page.blocks] == [
        (2, None), (6, "needs a GPU"), (16, None), (20, None), (25, "malformed marker"),
    ]  # fmt: skip
    assert page.blocks[2].source == "if x:\n    z = 3\n"
    assert page.blocks[3].source == "\nw = 4\n"
    assert [error.split(":")[1] for error in page.errors] == ["23", "26"]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(page.path) for page in RUNNABLE])
def test_page_runs(page: Page, tmp_path, monkeypatch, capsys):
    """Run the page's blocks in order in one namespace; a failure names the file and the block's line."""
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", [str(page.path)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 (pages may use the legacy global generator)
    # A module of its own, so that classes and dataclasses defined on the page can be found (and pickled).
    module = types.ModuleType("docs_page_" + re.sub(r"\W", "_", str(page.path)))
    module.__file__ = str(ROOT / page.path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    filename = str(ROOT / page.path)
    timings, registries, modules = [], snapshot_registries(), set(sys.modules)
    try:
        for block in page.blocks:
            if block.skip is not None:
                continue
            start, failure = time.perf_counter(), None
            try:
                # Padded so that tracebacks (and syntax errors) give the line numbers of the file itself.
                code = compile("\n" * (block.line - 1) + block.source, filename, "exec")
                exec(code, module.__dict__)
            except (Exception, SystemExit) as error:  # a block calling sys.exit() or argparse failing too
                failure = error
            if failure is not None:
                frames = traceback.extract_tb(failure.__traceback__)
                first = next((n for n, frame in enumerate(frames) if frame.filename == filename), 0)
                trace = "".join(
                    traceback.format_list(frames[first:]) + traceback.format_exception_only(failure)
                )
                pytest.fail(f"{page.path}, the block at line {block.line} failed:\n{trace}", pytrace=False)
            timings.append((block.line, time.perf_counter() - start))
    finally:
        restore_registries(registries)
        for name in set(sys.modules) - modules:  # examples/*.py a page imported: not left to other tests
            if str(getattr(sys.modules[name], "__file__", "")).startswith(str(ROOT / "examples")):
                del sys.modules[name]
        torch.set_num_threads(threads)
        module.__dict__.clear()
        gc.collect()
    with capsys.disabled():
        slow = [f"line {line}: {seconds:.1f}s" for line, seconds in timings if seconds > 5]
        if slow:
            print(f"\n{page.path}: slow blocks: {', '.join(slow)}", file=sys.stderr)


def test_the_readme_leaderboard_is_the_recorded_run():
    """The README's headline table is the one the recorded quick run's ``leaderboard.json`` renders to (kept
    in ``docs/results/data/reviews-quick/``), not a retyped copy that could drift from it."""
    import json

    from rlhf_bench.leaderboard.report import leaderboard_markdown

    payload = json.loads((ROOT / "docs/results/data/reviews-quick/leaderboard.json").read_text())
    table = leaderboard_markdown(payload).split("\n\n")[0]
    assert table.count("\n") > 5
    assert table in (ROOT / "README.md").read_text()
