# Each target sets up the virtual environment itself (reused while requirements are unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test test-fast demo demo-model webui bench-load bench-txt2img bench-paired bench-vae bench-sdxl

setup:
	@LDM_VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(PY) scripts/txt2img.py --prompt "a handwritten digit seven" --n_samples 8

webui: setup
	$(PY) scripts/webui.py

demo-model: setup
	$(PY) scripts/build_demo.py

test: setup
	$(PY) -m pytest -q -n auto tests

test-fast: setup
	$(PY) -m pytest -q -n auto -m "not slow" tests

bench-load: setup
	$(PY) benchmarks/bench_load.py

bench-txt2img: setup
	$(PY) benchmarks/bench_txt2img.py

bench-paired: setup
	$(PY) benchmarks/bench_paired.py

bench-vae: setup
	$(PY) benchmarks/bench_vae_memory.py --size 1024

bench-sdxl: setup
	$(PY) benchmarks/bench_sdxl.py
