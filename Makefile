# Two entry points: `make run` (install + generate with the bundled model) and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
JOBS ?= auto
# `make run` generates with the bundled model (random weights if its folder is missing).
MODEL ?= $(if $(wildcard models/dgemma-py-small/config.json),--model models/dgemma-py-small,--model random:small)

.PHONY: install test test-fast run lint bench clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"

# The playground's browser test (tests/test_playground.py) drives Debian's chromium through chromium-driver: installed
# here when missing and apt-get can (as root); otherwise that test skips and says why. Quiet, and a no-op once there.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	  >/dev/null 2>&1 || echo "make: no chromium (apt-get install -y chromium chromium-driver needs root and Debian);" \
	  "the playground browser test will skip"; }

# Every test (pytest-xdist spreads them over the cores), then `dgemma bench --quick` and `dgemma bench train --quick`
# as smoke tests of the benchmarks (their figures are printed, not asserted). This is what CI runs.
test: install browser
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile
	$(BIN)/dgemma bench --quick
	$(BIN)/dgemma bench train --quick

# Everything but the tests marked slow (servers, browsers, compiles, several processes, training end to end).
test-fast: install
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile -m "not slow"

run: install
	$(BIN)/dgemma generate $(MODEL) --max-new-tokens 64 "def fibonacci(n):"
	@# one held-out 6x6 Sudoku, solved by diffusion and by AR decoding of the same weights (dgemma/tasks/sudoku_eval.py)
	@if [ -f models/dgemma-sudoku-6x6/config.json ]; then $(BIN)/python -m dgemma.tasks.sudoku_eval demo models/dgemma-sudoku-6x6; fi

lint: install
	$(BIN)/ruff check dgemma tests

clean:
	rm -rf $(VENV) *.egg-info
