"""Sphinx configuration of the llm_env documentation site (Sphinx + Furo + MyST Markdown).

Build offline with warnings as errors (a broken cross-reference or a public name without a docstring fails):

    pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "llm_env"
author = "llm_env developers"
copyright = "2026, llm_env developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "results_pages",
    "docstring_check",  # docs/_ext: a public name documented without a docstring is a warning (-W: an error)
    "api_docstrings",  # docs/_ext: attribute docstrings as written, re-exported constants keep theirs
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "dollarmath", "deflist", "attrs_inline"]
myst_heading_anchors = 4

html_theme = "furo"
html_title = "llm_env"
html_static_path = ["_static"]

# The API reference comes from the docstrings (see api/); napoleon reads their "Args:" / "Returns:" sections.
# A module directive documents its ``__all__`` and a class directive its public methods, in source order;
# members without a docstring are left out by autodoc and reported by docstring_check (undoc-members off).
# The packages of the API reference (api_docstrings finds the docstrings of re-exported constants in them).
api_packages = ("llm_env", "agents", "rewards", "rlhf_bench")
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = True
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Warnings are errors (sphinx-build -W); unresolvable cross-references stay plain text instead of warnings, so
# a docstring may name an object of torch, transformers or gymnasium without an inventory of theirs (offline).
nitpicky = False
