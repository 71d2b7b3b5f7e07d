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
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
