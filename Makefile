# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RUN_DIR ?= runs/demo
# e.g. DEMO_ARGS='--recipe ldm': one recipe only (default: both)
DEMO_ARGS ?=

# Compiled DeepSpeed ops and Ray state stay inside the checkout, shared by runs and tests.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# The venv's tools first, for this process and every Ray worker it starts: torch builds
# DeepSpeed's ops with whichever `ninja` PATH finds, and a system ninja of another version
# (Debian's 1.11 writes a v5 build log, the venv's 1.13 a v7 one) makes each rebuild the op
# the other built (~40-90 s a time) whenever the driver and the workers alternate.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# DS_ACCELERATOR=cpu: for the CPU-only processes started here (tests, drivers). Training workers
# never inherit it: each sets its own from scaling.use_gpu (trainer/engine.py worker_device_env).
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a present .venv makes this a no-op.
$(STAMP): pyproject.toml
	@# libaio-dev: DeepSpeed's async-IO op (ZeRO-Infinity optimizer offload to disk); root installs it.
	@dpkg -s libaio-dev >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev >/dev/null; } || \
		echo "setup: warning: libaio-dev missing (needed only for engine.offload_optimizer=nvme)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)
	@echo "setup: .venv ready"

demo: setup
	$(PY) -m jobs.demo --run-dir $(RUN_DIR) $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check data_pipeline trainer jobs tests benchmarks

clean:
	rm -rf runs .pytest_cache
