PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline GPT-2 BPE for development checkouts that sit beside a shared cache; elsewhere tiktoken
# downloads it once as usual.
ifneq ($(wildcard ../shared/tiktoken),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken)
endif

.PHONY: install test test-compose up bench soak

install: $(STAMP)

# Reinstall only when the project's metadata changes, so `make install` is cheap to repeat.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest

# The image built and the compose stack run end to end on a private Docker engine (tests/compose), with
# stand-ins for the public base images made from Debian; needs root. Installs Debian's docker.io,
# docker-compose and debootstrap when missing.
test-compose: install
	@command -v dockerd >/dev/null && command -v docker-compose >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null; }
	$(BIN)/python -m pytest tests/compose/check_compose_stack.py -x --timeout 1800

# Every benchmark against its reference, then the plots and the README's section: under 20 minutes
# on the 2-core machine. BENCH_ARGS=--full runs the full-length versions (10-minute training race).
bench: install
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

# The whole stack on this machine: trainer, service and (if installed) Prometheus. Ctrl-C stops it.
up: install
	$(BIN)/python deploy/up.py

# The reliability suite at full size (see RELIABILITY.md): 1,000 fuzz cases per route, 2,000 requests
# at concurrency 32, 20 trainer SIGKILLs, 5 worker deaths. It prints its figures and writes them to
# tests/reliability/soak-report.json and RELIABILITY.md. `make test` runs the same tests at a small size.
soak: install
	RELIABILITY_SOAK=1 RELIABILITY_REPORT=tests/reliability/soak-report.json RELIABILITY_DOC=RELIABILITY.md \
		$(BIN)/python -m pytest tests/reliability --timeout 3600
