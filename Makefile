PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

# Offline GPT-2 BPE for development checkouts that sit beside a shared cache; elsewhere tiktoken
# downloads it once as usual.
ifneq ($(wildcard ../shared/tiktoken),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken)
endif

.PHONY: install test bench

install: $(STAMP)

# Reinstall only when the project's metadata changes, so `make install` is cheap to repeat.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Every benchmark against its reference, then the plots and the README's section: under 20 minutes
# on the 2-core machine. BENCH_ARGS=--full runs the full-length versions (10-minute training race).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)
