# Two entry points for a fresh machine: `make demo` and `make test` (`make test-all` adds the slow tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Flower: no telemetry, no runtime `uv sync` of app dependencies (they are installed here)
export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_DISABLE_UPDATE_CHECK = 1

# The demo's size: under 2 minutes on a busy 2-core machine, and far above the most-popular ranking
# (README, Set-up). Small rounds learn faster per second than the default 256 clients.
DEMO := --data synthetic --set clients_per_round=32 --set rounds=480 --set eval_every=60 --set targets=0

$(BIN)/fortress: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,plot,flower]"
	touch $@

.PHONY: demo test test-all test-cuda
demo: $(BIN)/fortress
	$(BIN)/fortress run $(DEMO) --out runs/demo --overwrite
	@echo
	@echo 'Next (README has the details):'
	@echo '  $(BIN)/fortress recommend runs/demo --user u0 -k 10      # the demo model'"'"'s top 10 for user u0'
	@echo '  $(BIN)/fortress run --data synthetic --out runs/demo-attack --set init_from=runs/demo \'
	@echo '      --set clients_per_round=32 --set rounds=60 --set attack=psmu      # 1% fake users push a target item'
	@echo '  $(BIN)/fortress run --data synthetic --out runs/demo-defended --set init_from=runs/demo \'
	@echo '      --set clients_per_round=32 --set rounds=60 --set attack=psmu --set defence=fortress   # the defence'
	@echo '  $(BIN)/fortress data stats FILE      # your own data (README, Data), then:'
	@echo '  $(BIN)/fortress run --data FILE --out runs/mine'
	@echo '  make test       # the fast tests (about 2 minutes); make test-all adds the slow ones'

test: $(BIN)/fortress
	$(BIN)/python -m pytest tests -m "not slow"
	@echo "(slow tests left out: make test-all runs them)"

test-cuda: $(BIN)/fortress
	$(BIN)/python -m pytest tests -m cuda -rA

test-all: test
	$(BIN)/python -m pytest tests -m slow
