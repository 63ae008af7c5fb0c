#!/usr/bin/env bash
# The smoke test `make image-gpu` runs on the image it built, on this CPU machine: sagellm's own
# engine (ENGINE=sagellm; the default, auto, would pick vLLM only where a GPU is visible) serves
# the bundled model as SageMaker starts it (`docker run IMAGE serve`): /ping turns 200, then one
# /generate answers with text. Usage: container/smoke.sh IMAGE
set -euo pipefail
image=${1:?usage: container/smoke.sh IMAGE}
name=sagellm-smoke-$$
docker run -d --rm --name "$name" -e ENGINE=sagellm -p 127.0.0.1::8080 "$image" serve >/dev/null
trap 'docker stop -t 10 "$name" >/dev/null 2>&1 || true' EXIT
port=$(docker port "$name" 8080/tcp | head -1 | sed 's/.*://')
for _ in $(seq 180); do
  curl -fsS "http://127.0.0.1:$port/ping" >/dev/null 2>&1 && break
  docker inspect "$name" >/dev/null 2>&1 || { echo "the container exited before /ping answered"; exit 1; }
  sleep 1
done
curl -fsS "http://127.0.0.1:$port/ping" >/dev/null || { docker logs "$name" | tail -20; exit 1; }
answer=$(curl -fsS "http://127.0.0.1:$port/generate" -H 'Content-Type: application/json' \
  -d '{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}')
echo "$answer"
echo "$answer" | python3 -c 'import json, sys; assert json.load(sys.stdin)["generated_text"].strip()'
docker logs "$name" 2>&1 | grep -m1 -i "engine" || true
echo "smoke test passed: $image serves /ping and /generate with ENGINE=sagellm"
