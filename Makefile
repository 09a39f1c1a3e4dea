# MEPG for ComfyUI — developer commands. Everything installs inside this checkout (.venv, .host).
SHELL := /bin/bash
PY := .venv/bin/python
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-contract test-e2e lint serve demo bench clean

setup:
	@bash scripts/setup_host.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-contract: setup
	$(PY) -m pytest tests/contract $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

serve: setup
	$(PY) scripts/serve.py --port $(PORT)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf demo-output bench-results test-artifacts .pytest_cache
