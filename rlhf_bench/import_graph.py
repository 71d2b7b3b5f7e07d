"""The project's import graph, read from the source with ``ast``: floors, layering violations and cycles.

``python -m rlhf_bench.import_graph`` prints the graph (the picture in ARCHITECTURE.md);
``tests/test_architecture.py`` fails when a package imports a floor above its own or an import cycle appears.

Every ``import`` counts, at module level or inside a function, except those under ``if TYPE_CHECKING:``
(annotations only, never executed). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module
of the project, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FLOORS", "cycles", "import_graph", "layering_violations", "render"]

FLOORS: dict[str, int] = {"llm_env": 0, "agents": 1, "rewards": 1, "rlhf_bench": 2}
"""Each top-level package's floor: a package may import only packages on lower floors (and itself)."""

ROOT = Path(__file__).resolve().parent.parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for package in FLOORS:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _imports(node)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def layering_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a package imports one on its own floor or above (not itself)."""
    out = []
    for source, targets in graph.items():
        top = source.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != top and FLOORS[other] >= FLOORS[top]:
                out.append((source, target))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def render(graph: dict[str, set[str]]) -> str:
    """The floors and, per module, the project modules it imports."""
    lines = []
    for floor in sorted(set(FLOORS.values()), reverse=True):
        packages = [p for p, f in FLOORS.items() if f == floor]
        below = sorted(
            {t.split(".")[0] for m, ts in graph.items() for t in ts if m.split(".")[0] in packages}
        )
        below = [p for p in below if p not in packages]
        lines.append(
            f"floor {floor}: {' | '.join(packages)}" + (f"   imports {', '.join(below)}" if below else "")
        )
    lines.append("")
    for name in sorted(graph):
        targets = sorted(graph[name])
        lines.append(f"{name} -> {', '.join(targets) if targets else '(nothing of the project)'}")
    return "\n".join(lines)


if __name__ == "__main__":
    graph = import_graph()
    print(render(graph))
    problems = [f"layering: {a} imports {b}" for a, b in layering_violations(graph)]
    problems += [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    print("\n".join(problems) if problems else "\nno layering violation, no import cycle")
    raise SystemExit(1 if problems else 0)
