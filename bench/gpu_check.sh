#!/usr/bin/env bash
# The prepared GPU check (issue 3): run on a lent single-GPU machine from the repository root,
# with bench/.gpu-carry brought along (make gpu-carry builds it: the bundled tokenizer, the load
# generator and wheels of the few pure-serving packages a bare torch+transformers machine lacks).
#   device run: bash bench/gpu_check.sh        (carry: bench/.gpu-carry)
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/.gpu-carry
PY=${PYTHON:-python3}
missing=$($PY - <<'PY'
import importlib.util
mods = ["flask", "gunicorn", "pydantic", "prometheus_client", "psutil", "aiohttp", "safetensors"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing from $CARRY/wheels: $missing"
  $PY -m pip install -q --no-index --find-links "$CARRY/wheels" flask gunicorn pydantic prometheus_client psutil aiohttp
fi
exec timeout 470 $PY bench/gpu_check.py --tokenizer "$CARRY/tokenizer" --out "${OUT:-/tmp/gpu-check}" "$@"
