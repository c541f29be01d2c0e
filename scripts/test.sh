#!/usr/bin/env bash
# README command 2: install, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
python -m pytest -q -p no:cacheprovider tests "$@"
