# Quick start: `make demo`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint bench services browser clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "update-worker needs Python >= 3.11 (set PYTHON=python3.x)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

## demo: create the virtual environment and run the seed scenario end to end
demo: $(STAMP)
	$(BIN)/update-worker demo

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy

## test: lint, make sure Redis, PostgreSQL and Chromium are there, then the whole suite on both
## backends (the dashboard's browser test included)
test: lint services browser
	$(BIN)/pytest

## services: start Redis and PostgreSQL when they are down, or fail naming the missing one
services:
	@bash scripts/services.sh

## browser: Debian's Chromium for the browser test: installed when missing, or fail naming it
browser:
	@bash scripts/browser.sh

## bench: update-worker and arq, SAQ, taskiq side by side (each anchor in .venv-bench-<name>)
bench: $(STAMP) services
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	@for anchor in arq saq taskiq; do \
		test -x .venv-bench-$$anchor/bin/python || $(PYTHON) -m venv .venv-bench-$$anchor; \
		.venv-bench-$$anchor/bin/pip install --quiet -e ".[bench-$$anchor]" || exit 1; \
	done
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-bench-* .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
