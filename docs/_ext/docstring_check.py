"""Sphinx extension: a public name of the API reference without a docstring is a warning (an error with -W).

autodoc silently leaves out a member that has no docstring (unless ``:undoc-members:`` is given), so a new
public function without one would simply vanish from the API reference. This extension makes it loud:

* ``autodoc-skip-member``: a public member that autodoc drops only because it has no documentation (a
  function, class, method or property; for a module with ``__all__``, any name in it, data included, which
  needs a ``#:`` comment or a docstring under its assignment) warns. Members named in ``:exclude-members:``
  (documented at another path) and private and dunder names are exempt.
* ``autodoc-process-docstring``: an object documented explicitly (``autoclass``, ``autofunction``, ...)
  whose docstring is empty warns. A method's or property's docstring inherited from a base class counts
  (``autodoc_inherit_docstrings``); a class needs its own (an exception would otherwise inherit
  ``Exception``'s, a dataclass gets its signature as ``__doc__``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from api_docstrings import submodule_doc
from sphinx.application import Sphinx
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)

CALLABLE_TYPES = (property, classmethod, staticmethod, functools.cached_property)


def _public(name: str) -> bool:
    """Whether a (possibly dotted) name's last component is public: no leading underscore."""
    return not name.rsplit(".", 1)[-1].startswith("_")


def own_class_doc(cls: type) -> str:
    """A class's own docstring: not inherited, and not the signature a dataclass writes when it has none."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str):
        return ""
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(") and "\n" not in doc:
        return ""
    return doc.strip()


def _location(app: Sphinx) -> str | None:
    """The document being read, so the warning names the page that documents the object."""
    env = getattr(app, "env", None)
    current = getattr(env, "current_document", None)
    return getattr(current, "docname", None) or getattr(env, "docname", None)


def _qualname(obj: Any, name: str) -> str:
    """``Class.method`` for a member (a property's getter names it), else the name autodoc gave."""
    target = getattr(obj, "fget", None) or getattr(obj, "func", None) or getattr(obj, "__func__", None) or obj
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    return f"{module}.{qualname}" if isinstance(qualname, str) and isinstance(module, str) else name


def _warn(app: Sphinx, message: str) -> None:
    LOGGER.warning(message, type="docstring", subtype="missing", location=_location(app))


def check_skipped_member(
    app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Warn about a public member that autodoc skips for want of a docstring.

    The one decision it changes: a constant that a package re-exports from a submodule where it has a
    docstring is kept (api_docstrings shows that docstring), not skipped.
    """
    if not skip or not _public(name) or name.startswith("__"):
        return None
    excluded = getattr(options, "exclude_members", None)
    if excluded is None and isinstance(options, dict):  # Sphinx < 9 passes a dict of the directive options
        excluded = options.get("exclude-members")
    if excluded and name in excluded:
        return None
    if what == "module":
        if inspect.isroutine(obj) or inspect.isclass(obj):
            _warn(app, f"public name {_qualname(obj, name)} has no docstring")
        elif any(submodule_doc(package, name, obj) for package in app.config.api_packages):
            return False
        else:
            _warn(
                app, f"public name {name} has no docstring (a '#:' comment or a string under its assignment)"
            )
    elif what in ("class", "exception") and (
        inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, CALLABLE_TYPES)
    ):
        _warn(app, f"public member {_qualname(obj, name)} has no docstring (inherited docstrings count)")
    return None


def check_docstring(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Warn when an object that autodoc documents has an empty docstring."""
    if not _public(name) or what == "module":
        return
    if what in ("class", "exception"):
        if inspect.isclass(obj) and not own_class_doc(obj):
            _warn(app, f"class {name} has no docstring of its own")
        return
    if what in ("function", "method", "property", "classmethod", "staticmethod") and not any(
        line.strip() for line in lines
    ):
        _warn(app, f"{what} {name} has no docstring (inherited docstrings count)")
    elif what in ("data", "attribute") and lines and not isinstance(obj, (str, bytes)):
        # Without a '#:' comment or a docstring under the assignment autodoc shows the docstring of the
        # value's type (``dict``'s for a dict): that is no documentation of the name.
        type_doc = inspect.getdoc(type(obj)) or ""
        if type_doc and " ".join(" ".join(lines).split()) == " ".join(type_doc.split()):
            _warn(app, f"{what} {name} has no docstring (a '#:' comment or a string under the assignment)")


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the two autodoc hooks."""
    app.setup_extension("sphinx.ext.autodoc")
    app.setup_extension("api_docstrings")
    app.connect("autodoc-skip-member", check_skipped_member)
    app.connect(
        "autodoc-process-docstring", check_docstring, priority=900
    )  # after napoleon and api_docstrings
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
