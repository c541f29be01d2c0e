#!/usr/bin/env bash
# One device call of the open GPU measurements (issue 5), run from the repo root on the device machine:
#
#   run(command="bash bench/device_call.sh graph",  carry=[".carry/gguf.part_aa"])
#   run(command="bash bench/device_call.sh steady", carry=[".carry/gguf.part_ab", ".carry/whl", ".carry/prompts64.jsonl"])
#   run(command="bash bench/device_call.sh grid")   # finds the GGUF and the wheel from the calls before
#
# or, for the tokens/s-vs-context-length PNG (the first call brings the GGUF's first half over and profiles a fused
# k = 8 step on random weights meanwhile):
#
#   run(command="bash bench/device_call.sh profile", carry=[".carry/gguf.part_aa"])
#   run(command="bash bench/device_call.sh context", carry=[".carry/gguf.part_ab", ".carry/whl", ".carry/prompts64.jsonl"])
#
# The machine is given back after 30 s idle: make the calls back to back, or the GGUF (98 MB, carried in two parts
# because one call carries at most 64 MiB) must be carried again. Each phase stays under the 10-minute limit
# (--time-budget-s cuts the last cells and says so in the JSON). Results land under $OUT; copy them to bench/data/
# and record every figure in bench/RESULTS.md with the command, date and device.
#
#   graph   random SmolLM2-shaped weights (no GGUF needed): stride 0 with overlap off / on / on + fuse_projections,
#           k = 8 with overlap / + fuse_projections; a per-kernel profile with fuse_projections; the Qwen3-8B shape
#           with fuse_projections. Writes /root/gg/fuse_arg: "--fuse-projections" when the fused runs were faster
#           at both strides, so that the SmolLM2 runs of the next calls use what measured faster (their JSON
#           settings record which)
#   steady  SmolLM2 real weights, B 64, --requests-per-slot 2 (the batch never drains); then the KV pool at 1.0
#           vs 0.5 of the demand (2x oversubscription)
#   grid    SmolLM2, B 16 / 32 / 64, temperature 0 and 0.6 (the throughput-vs-batch PNG)
#   context SmolLM2, B 64, outputs 1k / 2k / 4k / 8k tokens, stride 0 vs PillarAttn (the vs-context-length PNG)
#   profile random SmolLM2-shaped weights: per-kernel profile of a fused stride-0 and a fused k = 8 step
set -euo pipefail
phase=${1:?usage: bash bench/device_call.sh graph|steady|grid|context|profile}
R=$PWD
GG=/root/gg
mkdir -p "$GG"
[ -f .carry/gguf.part_aa ] && cp .carry/gguf.part_aa "$GG/"
if [ -f .carry/gguf.part_ab ] && [ ! -f "$GG/smollm2.gguf" ]; then cat "$GG/gguf.part_aa" .carry/gguf.part_ab > "$GG/smollm2.gguf"; fi
[ -f .carry/prompts64.jsonl ] && cp .carry/prompts64.jsonl "$GG/"
PKG=/tmp/sparsespec_$phase
rm -rf "$PKG"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$PKG" .
if ls .carry/whl/gguf-*.whl >/dev/null 2>&1; then cp .carry/whl/gguf-*.whl "$GG/"; fi
if ls "$GG"/gguf-*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps --no-index --target "$PKG" "$GG"/gguf-*.whl; fi
# the image lacks platformdirs; run outside the checkout so bench/kernels.py cannot shadow a package named kernels
export PYTHONPATH=$PKG SPARSESPEC_CACHE_DIR=/root/sscache TORCHINDUCTOR_CACHE_DIR=/root/indcache PYTHONUNBUFFERED=1
cd /tmp
date -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
bench() { timeout "$1" python3 -m sparsespec_compile.benchmark --model smollm2 --gguf "$GG/smollm2.gguf" \
    --prompts "$GG/prompts64.jsonl" "${@:2}" 2>&1 | grep -v -i warn | grep -v '^{' | tail -12 || echo "(rc $?: what ran is in the JSON)"; }
FUSE=$(cat "$GG/fuse_arg" 2>/dev/null || true)
echo "fuse arg: '${FUSE}'"
case $phase in
  graph)
    cp "$R/bench/gpu_graph_check.py" .
    timeout 220 python3 gpu_graph_check.py --out "$OUT" --runs \
      "s0_sync 0 on inductor 64 2048 256" "s0_overlap 0 on inductor 64 2048 256 on" \
      "s0_overlap_fuse 0 on inductor 64 2048 256 on fuse" "k8_overlap 8 on inductor 64 2048 256 on" \
      "k8_overlap_fuse 8 on inductor 64 2048 256 on fuse" 2>&1 | grep -v -i warn | cut -c1-600 | tail -12 || echo "(rc $?)"
    python3 - "$OUT/graph_check.json" "$GG/fuse_arg" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))["runs"]
tps = {k: v["tokens_per_s"] for k, v in r.items()}
faster = all(f"{b}_fuse" in tps and tps[f"{b}_fuse"] > tps[b] for b in ("s0_overlap", "k8_overlap"))
open(sys.argv[2], "w").write("--fuse-projections" if faster else "")
print("fuse_projections faster at both strides:", faster, tps)
PY
    timeout 90 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_fuse 0 pad inductor 64 2048 256 fuse" \
      2>&1 | grep -v -i warn | head -30 || echo "(rc $?)"
    timeout 150 python3 -m sparsespec_compile.benchmark --model qwen3-8b-random --methods stride0 --batch-sizes 32 \
      --output-lens 128 --prompt-len 4096 --temperature 0 --fuse-projections --time-budget-s 140 --out "$OUT/qwen_fuse" \
      2>&1 | grep -v -i warn | grep -v '^{' | tail -8 || echo "(rc $?)" ;;
  steady)
    bench 300 --methods stride0 pillar streaming --batch-sizes 64 --output-lens 4096 --temperature 0 \
      --requests-per-slot 2 --time-budget-s 270 $FUSE --out "$OUT/steady"
    for f in 1.0 0.5; do
      bench 115 --methods stride0 pillar --batch-sizes 64 --output-lens 2048 --temperature 0 \
        --kv-pool-fraction "$f" --time-budget-s 100 $FUSE --out "$OUT/pool$f"
    done ;;
  grid)
    bench 520 --methods hf_eager stride0 pillar --batch-sizes 16 32 64 --output-lens 2048 --temperature 0 0.6 \
      --hf-max-tokens 128 --time-budget-s 480 $FUSE --out "$OUT/grid" ;;
  context)
    bench 580 --methods stride0 pillar --batch-sizes 64 --output-lens 1024 2048 4096 8000 --temperature 0 \
      --time-budget-s 500 --fuse-projections --out "$OUT/context" ;;
  profile)
    cp "$R/bench/gpu_graph_check.py" .
    timeout 300 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_fuse 0 pad inductor 64 2048 256 fuse" \
      "k8_fuse 8 pad inductor 64 2048 256 fuse" 2>&1 | grep -v -i warn | head -60 || echo "(rc $?)" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
date -u
