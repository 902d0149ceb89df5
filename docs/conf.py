"""Sphinx configuration: MyST pages, an API reference from the packages' docstrings, the CLI reference from
the ``diffsynth`` argument parsers. Built with warnings as errors by tests/docs/test_build.py."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The docs build from the source tree, installed or not: every package's src/ folder, then our extensions.
for source in sorted(ROOT.glob("packages/*/src")) + sorted(ROOT.glob("apps/*/src")):
    sys.path.insert(0, str(source))
sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "DiffSynth Studio"
author = "DiffSynth Studio contributors"
copyright = "DiffSynth Studio contributors"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "cli_reference", "docstring_entries"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = "DiffSynth Studio"
html_theme_options = {"description": "Diffusion models for images and video, frugal with VRAM"}

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_class_signature = "separated"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
