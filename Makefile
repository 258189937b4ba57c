# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Flower: no telemetry, no runtime `uv sync` of app dependencies (they are installed here)
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_DISABLE_UPDATE_CHECK = 1

$(BIN)/fortress: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,plot,flower]"
	touch $@

.PHONY: demo test
demo: $(BIN)/fortress
	$(BIN)/fortress run --data synthetic --out runs/demo --set mode=fedavg --overwrite

test: $(BIN)/fortress
	$(BIN)/python -m pytest tests
