# Two entry points: `make run` (install + generate with the bundled model) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Until the bundled default model ships, `make run` uses random weights: it shows the pipeline, not quality.
MODEL ?= $(if $(wildcard models/dgemma-py-small/config.json),--model models/dgemma-py-small,--model random:small)

.PHONY: install test run lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"

test: install
	$(BIN)/python -m pytest

run: install
	$(BIN)/dgemma generate $(MODEL) --max-new-tokens 64 "def fibonacci(n):"

lint: install
	$(BIN)/ruff check dgemma tests

clean:
	rm -rf $(VENV) *.egg-info
