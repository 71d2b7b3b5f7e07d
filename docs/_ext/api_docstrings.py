"""Sphinx extension: two corrections to how autodoc and napoleon read this project's docstrings.

**Attribute, data and property docstrings are prose, kept as written.** Napoleon reads the first line of
such a docstring as ``type: description`` (its inline attribute syntax), so the field docstring
``beta of the KL (GRPO: 0.04).`` would render with the type ``beta of the KL (GRPO`` and the description
``0.04).``. This project writes the fields of its configs in the CleanRL style, a plain sentence under the
annotated field (whose annotation autodoc shows as the type anyway), and never uses that syntax. So the
docstring is saved before napoleon processes it and put back afterwards; functions and classes keep
napoleon's ``Args:`` / ``Returns:`` sections.

**Re-exported data keep their docstring.** A constant is documented by a ``#:`` comment or a string under
its assignment, which autodoc finds by parsing the module it documents the name in. A package that
re-exports the constant (``llm_env.KL_ESTIMATORS`` from ``llm_env.kl``) has no such comment, so autodoc
would show the docstring of the value's type (``dict``'s). The docstring is then taken from the submodule
of the same package that assigns the same object under the same name (and docstring_check keeps such a
constant in an automodule, which would otherwise skip it as undocumented).

**A class lists only the constructor parameters its docstring documents.** With
``autodoc_typehints = "description"`` autodoc adds every constructor parameter with its type to the class,
which for a dataclass (every config here) repeats its fields, already listed as attributes with their types
and docstrings, as a second list without descriptions. Functions and methods keep every parameter's type.
"""

from __future__ import annotations

import sys
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer, PycodeError

PROSE = frozenset({"attribute", "data", "property"})
NAPOLEON_PRIORITY = 500  # sphinx.ext.napoleon connects autodoc-process-docstring with the default priority

_saved: dict[tuple[str, str], list[str]] = {}


def attribute_doc(module_name: str, name: str) -> list[str] | None:
    """The ``#:`` comment or docstring of a module-level assignment, as autodoc would read it."""
    try:
        analyzer = ModuleAnalyzer.for_module(module_name)
        analyzer.analyze()
    except PycodeError:
        return None
    doc = analyzer.attr_docs.get(("", name))
    return list(doc) if doc else None


def submodule_doc(package: str, attribute: str, obj: Any) -> list[str] | None:
    """The docstring of ``attribute`` in the submodule of ``package`` that assigns ``obj`` to it."""
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith(f"{package}.") and getattr(module, attribute, None) is obj:
            doc = attribute_doc(module_name, attribute)
            if doc:
                return doc
    return None


def reexported_data_doc(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """For ``package.NAME`` without a docstring of its own, use the one of ``package.submodule.NAME``."""
    if what != "data" or "." not in name:
        return
    package, attribute = name.rsplit(".", 1)
    if not attribute_doc(package, attribute) and (doc := submodule_doc(package, attribute, obj)):
        lines[:] = [*doc, ""] if doc[-1] else doc


def save(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Before napoleon: keep a copy of a prose docstring."""
    if what in PROSE:
        _saved[what, name] = list(lines)


def restore(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """After napoleon: put the prose docstring back as it was written."""
    original = _saved.pop((what, name), None)
    if original is not None:
        lines[:] = original


def drop_undocumented_class_parameters(
    app: Sphinx, domain: str, objtype: str, contentnode: nodes.Element
) -> None:
    """After autodoc's typehints: remove a class's ``param``/``type`` fields of parameters not documented."""
    if domain != "py" or objtype not in ("class", "exception"):
        return
    for field_list in [node for node in contentnode.children if isinstance(node, nodes.field_list)]:
        fields = [(field, *field[0].astext().partition(" ")[::2]) for field in field_list.children]
        empty = {name for field, kind, name in fields if kind == "param" and not field[1].astext().strip()}
        for field, kind, name in fields:
            if kind in ("param", "type") and name in empty:
                field_list.remove(field)
        if not field_list.children:
            contentnode.remove(field_list)


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the hooks around napoleon's."""
    app.setup_extension("sphinx.ext.napoleon")
    app.add_config_value("api_packages", (), "env", types=frozenset({tuple, list}))
    app.connect("autodoc-process-docstring", reexported_data_doc, priority=NAPOLEON_PRIORITY - 200)
    app.connect("autodoc-process-docstring", save, priority=NAPOLEON_PRIORITY - 100)
    app.connect("autodoc-process-docstring", restore, priority=NAPOLEON_PRIORITY + 100)
    app.connect("object-description-transform", drop_undocumented_class_parameters, priority=600)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
