# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test system lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)  ## pull green 2021-01..03, train baseline / linear / LightGBM, promote the best, evaluate
	$(BIN)/tripcast quickstart

SYSTEM_TOOLS := chromium nginx prometheus

test: $(STAMP)  ## the whole suite, slow end-to-end tests included
	@for tool in $(SYSTEM_TOOLS); do command -v $$tool >/dev/null 2>&1 || missing=1; done; \
	  [ -z "$$missing" ] || $(MAKE) --no-print-directory system
	$(BIN)/ruff check src tests bench deploy
	$(BIN)/python -m pytest

system:  ## Debian's Chromium (browser tests), nginx and Prometheus (production profile); needs root and apt-get
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(SYSTEM_TOOLS) for the browser and production-profile tests (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_TOOLS) >/dev/null) \
	    || echo "could not install $(SYSTEM_TOOLS): the tests that need them will be skipped"; \
	else echo "missing some of $(SYSTEM_TOOLS) (apt-get install $(SYSTEM_TOOLS)): the tests that need them will be skipped"; fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench deploy

bench: $(STAMP)  ## needs the TLC files (TRIPCAST_TLC_MIRROR) and wrk
	$(BIN)/python bench/train.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/predlog.py
	$(BIN)/python bench/experiments.py

clean:
	rm -rf $(VENV) .tripcast .pytest_cache
