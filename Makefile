# Two entry points: `make run` (install + generate with the bundled model) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` generates with the bundled model (random weights if its folder is missing).
MODEL ?= $(if $(wildcard models/dgemma-py-small/config.json),--model models/dgemma-py-small,--model random:small)

.PHONY: install test run lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"

# The tests, then `dgemma bench --quick` as a smoke test of the benchmark (its figures are printed, not asserted).
test: install
	$(BIN)/python -m pytest
	$(BIN)/dgemma bench --quick

run: install
	$(BIN)/dgemma generate $(MODEL) --max-new-tokens 64 "def fibonacci(n):"

lint: install
	$(BIN)/ruff check dgemma tests

clean:
	rm -rf $(VENV) *.egg-info
