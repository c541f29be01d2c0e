#!/usr/bin/env bash
# Issue 17's H200 target, one device call: `sparsespec serve` (embedded SmolLM2, bf16, Inductor, CUDA graphs) under
# 256 concurrent streaming clients (GSM8K questions, 1,024 tokens each) against LLM.generate offline on the same
# requests, at --stream-interval 1 (every token its own chunk) and 16. Results: $OUT/serve_i*/serve_load.json.
#
#   bash bench/serve_wheels.sh                        # here (PyPI reachable): .carry/serve_whl, ~12 MB
#   run(command="bash bench/serve_device.sh", carry=[".carry/gguf.part_aa", ".carry/gguf.part_ab",
#       ".carry/whl", ".carry/prompts512.jsonl", ".carry/serve_whl"], timeout_s=600)
#
# Each run: ~1-2 min of server start-up (Inductor compile + warm-up), the load, then the offline LLM's own start-up.
set -euo pipefail
R=$PWD
GG=/root/gg
mkdir -p "$GG"
[ -f .carry/gguf.part_aa ] && cp .carry/gguf.part_aa "$GG/"
if [ -f .carry/gguf.part_ab ] && [ ! -f "$GG/smollm2.gguf" ]; then cat "$GG/gguf.part_aa" .carry/gguf.part_ab > "$GG/smollm2.gguf"; fi
PKG=/tmp/sparsespec_serve
rm -rf "$PKG"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$PKG" .
python3 -m pip install -q --no-deps --no-index --target "$PKG" .carry/whl/gguf-*.whl .carry/serve_whl/*.whl
export PYTHONPATH=$PKG SPARSESPEC_CACHE_DIR=/root/sscache TORCHINDUCTOR_CACHE_DIR=/root/indcache PYTHONUNBUFFERED=1
cd /tmp
date -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
# the embedded model from the GGUF, cached as safetensors where `sparsespec serve` (no MODEL_DIR) looks
python3 -c "from sparsespec_compile.models import load_smollm2; load_smollm2(gguf_path='$GG/smollm2.gguf')"
for I in ${INTERVALS:-1 16}; do
  timeout "${RUN_TIMEOUT:-280}" python3 "$R/bench/serve_load.py" --prompts "$R/.carry/prompts512.jsonl" \
      --num-requests 256 --concurrency 256 --max-tokens 1024 --out "$OUT/serve_i$I" \
      -- --max-num-seqs 256 --stream-interval "$I" ${SERVE_ARGS:-} 2>&1 | grep -v -i warn | tail -4 || echo "(rc $?)"
done
