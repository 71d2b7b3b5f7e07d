"""The API reference (docs/api/*.md) documents every public name of the four packages, each exactly once.

Nothing is built: the test reads the autodoc directives of the pages and applies autodoc's own rules:

* ``.. automodule:: M`` documents ``M`` and, unless ``:no-members:`` is given, every name of ``M.__all__``
  except those in ``:exclude-members:``, at the path ``M.name``;
* ``.. autoclass:: X`` (``autoexception``, ``autofunction``, ``autodata``) documents ``X``, prefixed with the
  module of the last ``.. currentmodule::`` / ``.. automodule::`` when ``X`` is not dotted.

Then it asserts that every public module of ``llm_env``, ``agents``, ``rewards`` and
``rlhf_bench.leaderboard`` is documented (a module without ``__all__`` must be listed in ``NOT_DOCUMENTED``
with its reason); that every name of a package's ``__all__`` is documented at the package's path (so
``llm_env.TextGenVectorEnv`` links resolve); that every name of a documented module's ``__all__`` is
documented at its path or, for a re-export, at the path of the same object; and that no object is documented
twice (Sphinx would warn about the duplicate, or the reader would find the same text at two places).
Whether each documented object has a docstring is checked by the build itself
(docs/_ext/docstring_check.py, ``sphinx-build -W``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
PACKAGES = ("llm_env", "agents", "rewards", "rlhf_bench.leaderboard")
PAGES = ("llm_env.md", "agents.md", "rewards.md", "leaderboard.md")
# Public modules without __all__, which the API reference leaves out on purpose.
NOT_DOCUMENTED = {
    "rlhf_bench.leaderboard.cli": "the `llm-env benchmark` command line, documented in the benchmark guide",
}

DIRECTIVE = re.compile(
    r"^\s*\.\. (?P<kind>automodule|autoclass|autoexception|autofunction|autodata|currentmodule|module)::"
    r"\s*(?P<target>\S+)\s*$"
)
OPTION = re.compile(r"^\s+:(?P<name>[\w-]+):\s*(?P<value>.*)$")
CONTINUATION = re.compile(r"^\s+\S")


@dataclass
class Directive:
    """One autodoc directive of a page, with its options."""

    kind: str
    target: str
    page: str
    line: int
    options: dict[str, str] = field(default_factory=dict)


def parse_directives(path: Path) -> list[Directive]:
    """The autodoc directives of one page, ``auto*`` targets made absolute (``currentmodule`` applied)."""
    directives: list[Directive] = []
    module = ""
    option = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = DIRECTIVE.match(line)
        if match:
            kind, target = match["kind"], match["target"]
            if kind in ("currentmodule", "module"):
                module, option = target, None
                continue
            if kind == "automodule":
                module = target
            elif "." not in target and module:
                target = f"{module}.{target}"
            directives.append(Directive(kind, target, path.name, number))
            option = None
            continue
        if directives and (match := OPTION.match(line)):
            option = match["name"]
            directives[-1].options[option] = match["value"]
        elif directives and option and CONTINUATION.match(line):
            directives[-1].options[option] += " " + line.strip()
        else:
            option = None
    return directives


def resolve(path: str) -> Any:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(path)


def names(value: str) -> set[str]:
    """The comma-separated names of a directive option."""
    return {name.strip() for name in value.split(",") if name.strip()}


def public_modules() -> dict[str, ModuleType]:
    """Every public module of the four packages, the packages included."""
    modules: dict[str, ModuleType] = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        modules[package_name] = package
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                modules[info.name] = importlib.import_module(info.name)
    return modules


def is_value(obj: Any) -> bool:
    """A plain value (number, string, ...): equal values are not the same documented object."""
    return isinstance(obj, (bool, int, float, complex, str, bytes, tuple, frozenset)) or obj is None


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, list[Directive]], dict[str, Directive], dict[str, ModuleType]]:
    """(documented path -> the directives documenting it, documented module -> its automodule, modules)."""
    modules = public_modules()
    documented: dict[str, list[Directive]] = {}
    automodules: dict[str, Directive] = {}
    for page in PAGES:
        for directive in parse_directives(API / page):
            if directive.kind != "automodule":
                documented.setdefault(directive.target, []).append(directive)
                continue
            assert directive.target not in automodules, f"{directive.target} has two automodule directives"
            automodules[directive.target] = directive
            if "no-members" in directive.options:
                continue
            module = importlib.import_module(directive.target)
            exported = set(getattr(module, "__all__", ()))
            excluded = names(directive.options.get("exclude-members", ""))
            stale = excluded - exported
            assert not stale, (
                f"{page}:{directive.line}: {directive.target} excludes names not in __all__: {stale}"
            )
            for name in sorted(exported - excluded):
                documented.setdefault(f"{directive.target}.{name}", []).append(directive)
    return documented, automodules, modules


def test_index_lists_every_page() -> None:
    index = (API / "index.md").read_text(encoding="utf-8")
    toctree = index.split("```{toctree}", 1)[1].split("```", 1)[0]
    entries = [
        line.strip() for line in toctree.splitlines() if line.strip() and not line.strip().startswith(":")
    ]
    assert entries == [page.removesuffix(".md") for page in PAGES]
    assert sorted(path.name for path in API.glob("*.md")) == sorted((*PAGES, "index.md"))


def test_every_public_module_is_documented(reference) -> None:
    _, automodules, modules = reference
    missing = []
    for name, module in modules.items():
        if name in NOT_DOCUMENTED:
            assert not hasattr(module, "__all__"), f"{name} now has __all__: document it"
        elif name not in automodules:
            missing.append(name)
    assert not missing, f"public modules without an automodule directive in docs/api: {missing}"
    assert set(NOT_DOCUMENTED) <= set(modules)


def test_every_package_name_is_documented_at_the_package(reference) -> None:
    documented, _, modules = reference
    for package in (*PACKAGES, "llm_env.adapters"):
        missing = [name for name in modules[package].__all__ if f"{package}.{name}" not in documented]
        assert not missing, f"{package}.__all__ names not documented as {package}.<name>: {missing}"


def test_every_module_name_is_documented_once(reference) -> None:
    documented, automodules, modules = reference
    objects: dict[int, str] = {}
    values: dict[str, list[Any]] = {}  # last component of a documented path -> its objects
    for path in sorted(documented):
        obj = resolve(path)  # every target exists
        values.setdefault(path.rsplit(".", 1)[1], []).append(obj)
        where = documented[path]
        assert len(where) == 1, (
            f"{path} is documented {len(where)} times: {[(d.page, d.line) for d in where]}"
        )
        if not is_value(obj):
            other = objects.setdefault(id(obj), path)
            assert other == path, f"the same object is documented as {other} and as {path}"
    for name, module in modules.items():
        if name in NOT_DOCUMENTED or name not in automodules:
            continue
        for member in getattr(module, "__all__", ()):
            obj = getattr(module, member)
            here = f"{name}.{member}"
            elsewhere = (
                id(obj) in objects if not is_value(obj) else any(v is obj for v in values.get(member, ()))
            )
            assert here in documented or elsewhere, (
                f"{here} is in __all__ but documented nowhere (excluded from {name}'s automodule, and "
                "the same object is not documented at another path)"
            )
