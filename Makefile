# MEPG for ComfyUI — developer commands. Everything installs inside this checkout (.venv, .host).
SHELL := /bin/bash
PY := .venv/bin/python
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup setup-compat test test-compat test-unit test-contract test-e2e lint serve demo bench clean

setup:
	@bash scripts/setup_host.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The second host: ComfyUI 0.33.0 from ../shared/hosts (absent in a user's clone: says so and succeeds).
COMPAT_VERSION := 0.33.0
COMPAT_TESTS ?= tests/contract tests/e2e tests/browser
COMPAT_ENV := MEPG_COMFYUI_DIR=$(CURDIR)/.host/ComfyUI-$(COMPAT_VERSION) \
	MEPG_HOST_WORK_DIR=$(CURDIR)/.host/compat-$(COMPAT_VERSION) MEPG_ARTIFACTS=$(CURDIR)/test-artifacts/compat-$(COMPAT_VERSION)

setup-compat: setup
	@bash scripts/setup_compat_host.sh; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ] || exit $$rc

test-compat: setup
	@rc=0; bash scripts/setup_compat_host.sh || rc=$$?; \
	if [ $$rc -eq 3 ]; then exit 0; elif [ $$rc -ne 0 ]; then exit $$rc; fi; \
	echo "[test-compat] contract, e2e and browser tiers on ComfyUI $(COMPAT_VERSION)"; \
	$(COMPAT_ENV) .venv-compat/bin/python -m pytest $(COMPAT_TESTS) $(PYTEST_ARGS)

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
