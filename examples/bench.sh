#!/usr/bin/env bash
# The end-to-end benchmark of the README (sized for a GPU). Flags after the script override these, e.g. on a CPU:
#   bash examples/bench.sh --model tiny-random --device cpu --batch-sizes 2 --output-lens 16 --methods stride0 pillar
set -euo pipefail
sparsespec bench --model smollm2 --methods hf_eager hf_static_compile stride0 sparsespec pillar streaming \
    --batch-sizes 16 32 64 --output-lens 1024 4096 --out bench_out/e2e "$@"
