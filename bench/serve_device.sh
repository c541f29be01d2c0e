#!/usr/bin/env bash
# Issue 17's H200 target: `sparsespec serve` (embedded SmolLM2, bf16, Inductor, CUDA graphs) under 256 concurrent
# streaming clients (GSM8K questions, 1,024 tokens each) against LLM.generate offline on the same requests, at
# --stream-interval 1 (every token its own chunk) and 16 (INTERVALS="1 16"). Results: $OUT/serve_i*/serve_load.json.
# Run from the repo root on the device. The carry limit (64 MiB a call) splits it in two calls; whatever a call
# carries is staged in /root/gg, which lasts while the machine stays warm:
#
#   bash bench/serve_wheels.sh                                   # here, PyPI reachable: .carry/serve_whl (~12 MB)
#   run(command="bash bench/serve_device.sh", carry=[".carry/gguf.part_aa"])
#   run(command="INTERVALS=1 bash bench/serve_device.sh", carry=[".carry/gguf.part_ab", ".carry/serve_whl",
#       ".carry/whl", ".carry/prompts512.jsonl"], timeout_s=600)
#   run(command="INTERVALS=16 bash bench/serve_device.sh", timeout_s=600)     # finds everything staged
#
# Each interval: server start-up (Inductor compile + warm-up), the load, then the offline LLM's start-up and run.
set -euo pipefail
R=$PWD
GG=/root/gg
mkdir -p "$GG"
[ -f .carry/gguf.part_aa ] && cp .carry/gguf.part_aa "$GG/"
if [ -f .carry/gguf.part_ab ] && [ ! -f "$GG/smollm2.gguf" ]; then cat "$GG/gguf.part_aa" .carry/gguf.part_ab > "$GG/smollm2.gguf"; fi
[ -d .carry/serve_whl ] && mkdir -p "$GG/serve_whl" && cp .carry/serve_whl/*.whl "$GG/serve_whl/"
[ -d .carry/whl ] && cp .carry/whl/*.whl "$GG/"
[ -f .carry/prompts512.jsonl ] && cp .carry/prompts512.jsonl "$GG/"
export SPARSESPEC_CACHE_DIR=/root/sscache TORCHINDUCTOR_CACHE_DIR=/root/indcache PYTHONUNBUFFERED=1
CACHED=$SPARSESPEC_CACHE_DIR/smollm2-135m-instruct-q4_1/model.safetensors
if { [ ! -f "$CACHED" ] && [ ! -f "$GG/smollm2.gguf" ]; } || ! ls "$GG"/serve_whl/*.whl >/dev/null 2>&1 \
    || [ ! -f "$GG/prompts512.jsonl" ]; then
  echo "staged in $GG: $(ls "$GG" | tr '\n' ' '); carry the rest (see the header) and call again"
  exit 0
fi
PKG=/tmp/sparsespec_serve
rm -rf "$PKG"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$PKG" .
python3 -m pip install -q --no-deps --no-index --target "$PKG" "$GG"/serve_whl/*.whl
if ls "$GG"/gguf-*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index --target "$PKG" "$GG"/gguf-*.whl; fi
export PYTHONPATH=$PKG
cd /tmp  # outside the checkout, so the installed package is the one imported
date -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
# the embedded model, cached as safetensors where `sparsespec serve` (no MODEL_DIR) looks for it
[ -f "$CACHED" ] || python3 -c "from sparsespec_compile.models import load_smollm2; load_smollm2(gguf_path='$GG/smollm2.gguf')"
for I in ${INTERVALS:-1 16}; do
  timeout "${RUN_TIMEOUT:-560}" python3 "$R/bench/serve_load.py" --prompts "$GG/prompts512.jsonl" \
      --num-requests 256 --concurrency 256 --max-tokens 1024 --out "$OUT/serve_i$I" \
      -- --max-num-seqs 256 --stream-interval "$I" ${SERVE_ARGS:-} 2>&1 | grep -v -i warn | tail -4 || echo "(rc $?)"
done
