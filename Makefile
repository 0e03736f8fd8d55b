# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test browser lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)  ## pull green 2021-01..03, train baseline / linear / LightGBM, promote the best, evaluate
	$(BIN)/tripcast quickstart

test: $(STAMP)  ## the whole suite, slow end-to-end tests included
	@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory browser
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

browser:  ## Debian's Chromium for the browser tests (needs root and apt-get; without it they are skipped)
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Chromium for the browser tests (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "could not install Chromium: the browser tests will be skipped"; \
	else echo "no Chromium (apt-get install chromium): the browser tests will be skipped"; fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)  ## needs the TLC files (TRIPCAST_TLC_MIRROR) and wrk
	$(BIN)/python bench/train.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/monitor.py
	$(BIN)/python bench/predlog.py
	$(BIN)/python bench/experiments.py

clean:
	rm -rf $(VENV) .tripcast .pytest_cache
