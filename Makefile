# Each target sets up the virtual environment itself (reused while requirements are unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test bench-load

setup:
	@LDM_VENV=$(VENV) bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

bench-load: setup
	$(PY) benchmarks/bench_load.py
