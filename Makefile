# besa-rs: the two commands are `make demo` and `make test`. Both bootstrap everything.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.deps-stamp
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test build deps lint fmt test-rust test-python ste-ext ct-newest clean

$(PY):
	python3 -m venv $(VENV)

$(UV): | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# Pinned dependencies (uv keeps a cache, so a clean clone re-installs in seconds).
$(STAMP): requirements/lock.txt requirements/nodeps.txt | $(UV)
	$(UV) pip sync -q --python $(PY) requirements/lock.txt
	$(UV) pip install -q --python $(PY) --no-deps -r requirements/nodeps.txt
	touch $(STAMP)

deps: $(STAMP)

# The newest compressed-tensors release, the reference of the pack-quantized format, in its own
# --target directory (the venv keeps 0.14 for the sparse-bitmask interop test); only test
# subprocesses import it (tests/ct_newest.py). Its dependencies come from the lock.
CT_NEWEST := $(VENV)/ct-newest
$(CT_NEWEST)/.stamp: requirements/ct-newest.txt | $(STAMP)
	rm -rf $(CT_NEWEST)
	$(UV) pip install -q --python $(PY) --no-deps --target $(CT_NEWEST) -r requirements/ct-newest.txt
	touch $@

ct-newest: $(CT_NEWEST)/.stamp

# Release build of the Rust extension into the venv (incremental; quick when nothing changed).
build: $(STAMP)
	$(VENV)/bin/maturin develop --release --uv -q

# Compile the fused CUDA extension of besa_rs.ste (no GPU needed: nvcc comes from the pinned
# wheels), so a kernel that does not build fails the test command.
ste-ext: build
	$(PY) -m besa_rs.ste build

demo: build
	$(PY) -m besa_rs.demo

test-rust:
	cargo test --workspace --release -q

test-python: build ste-ext ct-newest
	$(PY) -m pytest -q

test: build test-rust test-python

lint: $(STAMP)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

fmt:
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

clean:
	cargo clean
	rm -rf $(VENV)
