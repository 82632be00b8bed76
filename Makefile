# Two entry points on a fresh clone (see README.md):
#   make demo   creates .venv, installs everything, runs the main example (prints, writes a PNG)
#   make test   creates .venv, installs everything, runs the test suite twice: with the compiled
#               extension, then with IMPLICIT_TORCH_NO_EXT=1 (its pure-PyTorch fallback)
# IMPLICIT_TORCH_STRICT_BUILD=1 (set by .ci/run) makes a failed compile of csrc/ an error.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint docs clean

CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)

$(STAMP): requirements-dev.txt pyproject.toml setup.py $(CSRC)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: it is a build dependency of the extension.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/ridge_hypergradient.py

test: $(STAMP)
	$(PY) -m pytest -q
	IMPLICIT_TORCH_NO_EXT=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation (docs/), from the docstrings; every Sphinx warning is an error.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info examples/out docs/_build
