#!/usr/bin/env bash
# Builds bench/.gpu-carry (git-ignored, well under the 64 MiB a device run may carry): the bundled
# tokenizer and wheels of the serving packages for Python 3.10-3.12 (bench/loadgen.py is tracked).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=bench/.gpu-carry
rm -rf "$CARRY" && mkdir -p "$CARRY/tokenizer" "$CARRY/wheels"
MODEL=$(.venv/bin/python -m sagellm.model.bundled | tail -1)
cp "$MODEL"/tokenizer.json "$MODEL"/tokenizer_config.json "$MODEL"/chat_template.jinja "$CARRY/tokenizer/"
for py in 310 311 312; do
  .venv/bin/pip download -q -d "$CARRY/wheels" --only-binary=:all: --python-version $py \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    flask==3.1.3 gunicorn==27.0.1 pydantic==2.14.3 prometheus_client==0.26.0 psutil==7.2.2 aiohttp==3.14.5
done
du -sh "$CARRY"
