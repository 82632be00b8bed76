"""Build script. The package is pure Python for now; the compiled extension of csrc/ will be
added here as an optional build step (see the issue tracker)."""

from setuptools import setup

setup()
