# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test system-deps sync-rules dashboards bench prices image clean

$(VENV)/.runtime: pyproject.toml setup.py sidecar/_lane.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

## demo: mock upstream + sidecar + traffic + live view (no key, no network)
demo: $(VENV)/.runtime
	$(BIN)/sidecar demo

## system-deps: Debian packages the tests use for real (promtool from `prometheus`)
system-deps:
	scripts/install-system-deps

## test: lint, type-check and the whole test suite
test: $(VENV)/.dev system-deps
	$(BIN)/ruff check sidecar tests scripts bench fuzz grafana
	$(BIN)/mypy
	$(BIN)/pytest

## sync-rules: copy the alert rules into the Kubernetes and Helm manifests after editing them
sync-rules: $(VENV)/.runtime
	$(BIN)/python scripts/sync-rules

## dashboards: regenerate grafana/dashboards/*.json from grafana/generate.py (Grafana's SDK)
dashboards: $(VENV)/.dev
	$(BIN)/python grafana/generate.py

## prices: regenerate sidecar/data/prices.json from the pinned genai-prices (pyproject.toml)
prices: $(VENV)/.dev
	$(BIN)/python scripts/update-prices

## image: build deploy/Dockerfile (Docker, or buildah without an engine) and smoke-test it
image: $(VENV)/.runtime system-deps
	scripts/image-smoke

## bench: the side-by-side benchmark (by hand, not in CI; ~5 minutes; see docs/PERFORMANCE.md)
bench: $(VENV)/.dev
	$(BIN)/python bench/bench.py --markdown bench-results.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
