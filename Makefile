# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint install clean bench

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	# torch first, pinned exactly, so nothing pulls a CUDA build as a dependency.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

# ruff (119 columns) and the import-layer contracts of .importlinter; the suite runs both too (tests/unit/test_layers.py)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow --run-slow $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(PIP) install --quiet -e ".[test,bench]"
	for b in forward moge train_step generate featurize pipeline convert_memory; do $(PY) benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) runs build *.egg-info
