# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/fortress: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $@

.PHONY: demo test
demo: $(BIN)/fortress
	$(BIN)/fortress run --data synthetic --out runs/demo --set mode=fedavg

test: $(BIN)/fortress
	$(BIN)/python -m pytest tests
