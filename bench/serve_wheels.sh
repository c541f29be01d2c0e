#!/usr/bin/env bash
# Wheels `sparsespec serve` and bench/serve_load.py need, for a machine without PyPI (the GPU image: Python 3.12,
# manylinux x86-64), into DIR (default .carry/serve_whl). Run here, carry DIR, install there with
#   python3 -m pip install -q --no-index --find-links DIR --target "$PKG" fastapi uvicorn httptools uvloop prometheus-client openai
# (--target next to the package: what bench/device_call.sh does for gguf).
set -euo pipefail
DIR=${1:-.carry/serve_whl}
PYV=${PYV:-3.12}
mkdir -p "$DIR"
python3 -m pip download -q --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR" fastapi uvicorn httptools uvloop prometheus-client openai
ls "$DIR"
