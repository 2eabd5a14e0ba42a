# `make demo` runs the main job; `make test` runs the whole suite. Both set up what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit services bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e ".[all]" --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/poolguard demo

services:
	@bash scripts/services.sh

lint: $(STAMP)
	$(BIN)/ruff check poolguard tests benchmarks
	$(BIN)/ruff format --check poolguard tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest tests/unit -q

test: $(STAMP) services lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP) services
	$(BIN)/python -m benchmarks.checkout

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
