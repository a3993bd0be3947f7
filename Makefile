# Two entry points for a fresh machine (see README.md):
#   make demo   create .venv, install, run the embedded-default distillation
#   make test   create .venv, install with the test extra, run the test suite
# torch is pinned to the CPU wheel 2.13.0 so pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP     = $(VENV)/bin/pip
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=68" wheel
	$(PIP) install --quiet "$(TORCH)"

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet "$(TORCH)" -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet "$(TORCH)" -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/distill demo

test: $(VENV)/.installed-test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) benchmarks/objectives.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
