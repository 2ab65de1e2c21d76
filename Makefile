PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_VENV := .bench-venv
BENCH_STAMP := $(BENCH_VENV)/.installed

# Offline GPT-2 BPE for development checkouts that sit beside a shared cache; elsewhere tiktoken
# downloads it once as usual.
ifneq ($(wildcard ../shared/tiktoken),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken)
endif

.PHONY: install test test-compose up bench bench-env soak

# System programs the tests run for real (tests/system_packages.py installs them as root on Debian or
# Ubuntu, and otherwise stops at once with the command that does): program=Debian package.
TEST_PROGRAMS := promtool=prometheus prometheus=prometheus docker-compose=docker-compose chromium=chromium \
	haproxy=haproxy kubectl=kubernetes-client
COMPOSE_PROGRAMS := dockerd=docker.io docker-compose=docker-compose debootstrap=debootstrap

install: $(STAMP) $(VENV)/.kernels

# Reinstall only when the project's metadata changes, so `make install` is cheap to repeat.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Our decode kernels (model/csrc), compiled once with the system's C++ compiler. Without one the step
# says so and the model runs on torch's kernels (model/native.py).
$(VENV)/.kernels: $(STAMP) model/csrc/decode_kernels.cpp
	MAX_JOBS=1 $(BIN)/python -m model.native_build
	touch $@

# The programs are checked first, so that a machine without them stops in seconds, not test by test.
# Test files are spread over TEST_WORKERS processes (pytest-xdist), a file's tests kept together so that
# they share its services.
TEST_WORKERS ?= 2
test:
	@$(PYTHON) tests/system_packages.py $(TEST_PROGRAMS)
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The image built and the compose stack run end to end on a private Docker engine (tests/compose), with
# stand-ins for the public base images made from Debian; needs root. Installs Debian's docker.io,
# docker-compose and debootstrap when missing; runs the checks with docker-compose 1.29 and with Compose v2
# (Debian trixie's plugin, fetched into ~/.cache/gpt-service).
test-compose:
	@$(PYTHON) tests/system_packages.py $(COMPOSE_PROGRAMS)
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m pytest tests/compose/check_compose_stack.py -x --timeout 1800

# Every benchmark against its reference, then the plots and the README's section: under 20 minutes
# on the 2-core machine, once bench-env is built. BENCH_ARGS=--full runs the full-length versions
# (10-minute training race).
bench: install bench-env
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

# The decode benchmark's peers (llama.cpp, CTranslate2, onnxruntime) in an environment of their own,
# never the product's: the project plus bench/peers-requirements.txt, each peer installed on its own
# so that one that fails is reported missing by the benchmark, with pip's reason. llama.cpp compiles
# from source (once; about 10 minutes on 2 quiet cores); conversions are cached under .cache/bench/.
bench-env: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml bench/peers-requirements.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e '.[test]'
	$(BENCH_VENV)/bin/python -m bench.peer_install bench/peers-requirements.txt
	touch $(BENCH_STAMP)

# The whole stack on this machine: trainer, service and (if installed) Prometheus. Ctrl-C stops it.
# Flags go in ARGS (make up ARGS="--port 9000"); UP_* variables work too.
up: install
	$(BIN)/python deploy/up.py $(ARGS)

# The reliability suite at full size (see RELIABILITY.md): 1,000 fuzz cases per route, 2,000 requests
# at concurrency 32, 20 trainer SIGKILLs, 5 worker and HTTP server deaths, 2,000 slowloris connections. It prints its figures and writes them to
# tests/reliability/soak-report.json and RELIABILITY.md. `make test` runs the same tests at a small size.
# The check that RELIABILITY.md matches the last report is left out: this run writes both.
soak: install
	RELIABILITY_SOAK=1 RELIABILITY_REPORT=tests/reliability/soak-report.json RELIABILITY_DOC=RELIABILITY.md \
		$(BIN)/python -m pytest tests/reliability --timeout 3600 --deselect tests/reliability/test_reliability_doc.py::test_the_figures_are_the_last_soak_reports
