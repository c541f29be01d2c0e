#!/usr/bin/env bash
# README command 1: install, then run the demo on the embedded SmolLM2-135M-Instruct (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sparsespec demo "$@"
