# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Huge pages for glibc's large allocations: XLA:CPU's per-step temp buffer is otherwise page-faulted
# in afresh every step (BENCHMARKS.md: 500k faults, ~8% of a MiniLM train step on 2 cores).
CPU_ENV := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

# Without byte-compiling all of site-packages (a minute on 2 cores): the runs below write the bytecode of what
# they import, on first import (PYTHONDONTWRITEBYTECODE cleared for them).
PIP := $(BIN)/pip install -q --no-compile
RUN := PYTHONDONTWRITEBYTECODE= HF_HUB_OFFLINE=1

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, pinned: an unpinned torch pulls GBs of CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[torch,dev]'
	touch $@

.PHONY: install demo test
install: $(BIN)/.installed

# convert all-MiniLM-L6-v2 -> train on bundled data (3 tasks) -> export -> eval before/after.
demo: install
	$(CPU_ENV) $(RUN) $(BIN)/python -m piccolo_jax.train --config=demo --workdir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# Two pytest workers, a test file each at a time (its module fixtures, and test_faults' one straight run,
# built once), the longest files first (tests/conftest.py): much of a test is single-threaded (imports,
# tracing, compiling, starting subprocesses).
test: install
	$(RUN) $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests
