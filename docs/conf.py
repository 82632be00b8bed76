"""Sphinx configuration: the API reference is built from the docstrings (autodoc + napoleon for
the Google-style ``Args:``/``Returns:`` sections). Build: ``make docs`` (warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "implicit_torch"
author = "the implicit_torch engineers"
copyright = "2026, " + author

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"  # the docstrings state the shapes and types
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
html_theme = "alabaster"
html_static_path = ["_static"]
exclude_patterns = ["_build"]
nitpicky = False
# Field names shared by several state NamedTuples (``stepsize``, ``error``) make napoleon's
# ``:ivar:`` cross-references ambiguous; that ambiguity is harmless, every other warning is an
# error.
suppress_warnings = ["ref.python"]
