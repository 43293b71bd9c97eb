# Tandem — every target here works; see README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= auto

.PHONY: help install test demo describe bench-synthetic clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/' | expand -t 12

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install Tandem with its dev tools

test: install  ## run the test suite
	$(PY) -m pytest -q

describe: install  ## describe the dataset (DATA=path|synthetic, default: ML-100K if present)
	$(VENV)/bin/tandem data describe $(if $(filter auto,$(DATA)),,$(DATA))

demo: install describe  ## set up and run the pipeline end to end on the default data

bench-synthetic: install  ## time the synthetic generator at 20M ratings (peak memory too)
	$(PY) bench/synthetic_scale.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
