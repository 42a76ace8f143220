# Every target sets itself up on a fresh machine: it creates .venv if absent and installs
# iadkit with what that target needs. torch/torchvision come from this machine's disk
# (pip is capped at torch 2.14.1 / torchvision 0.29.1 here).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.iadkit-installed
# Tests use at most two threads: the CI machine has two cores.
export OMP_NUM_THREADS ?= 2

.PHONY: setup lint test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/iadkit demo

bench: $(STAMP)
	$(PY) bench/patchcore_perf.py

clean:
	rm -rf $(VENV) build dist .pytest_cache
