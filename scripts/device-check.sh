#!/usr/bin/env bash
# CUDA checks for a machine with a GPU and its own PyTorch but no Rust toolchain: runs a skinsam
# binary built elsewhere against that machine's libtorch, then
#   1. parity on CUDA against the CPU-made goldens (tiny, then full-size vit_b),
#   2. scripts/bench.sh for vit_b (official package vs skinsam, fp32/bf16/fp16, side by side),
#   3. scripts/loadgen.sh (serving through gRPC, GPU memory gauge scraped from /metrics),
#   4. scripts/bench.sh for vit_l and vit_h.
# Usage: scripts/device-check.sh BIN WHEEL_DIR DATA_DIR OUT_DIR
#   BIN        a release skinsam binary (target/release/skinsam)
#   WHEEL_DIR  wheels to add to that Python (segment-anything), may be empty
#   DATA_DIR   images/ + masks/<stem>_segmentation.png for the precision agreement
# Each step logs to OUT_DIR; a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "$1"); WHEELS=$2; DATA=$3; OUT=$4
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
torch_dir=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__))')
nvidia_libs=$(ls -d "$torch_dir"/../nvidia/*/lib "$torch_dir"/../nvidia/*/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$torch_dir/lib:$nvidia_libs${LD_LIBRARY_PATH:-}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  nproc
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME.log, never stops the script
  local name=$1; shift
  echo "== $name"
  local t=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name rc=$rc in $((SECONDS - t)) s" | tee -a "$OUT/steps.txt"
}

step parity-tiny "$BIN" parity --device cuda --golden tests/fixtures/golden
step golden-vit_b $PY scripts/make_golden.py --variant vit_b --out target/golden-vit_b
step parity-vit_b "$BIN" parity --device cuda --golden target/golden-vit_b
bench() {  # bench VARIANTS
  step "bench-${1// /-}" env BIN="$BIN" PYTHON="$PY" DEVICE=cuda VARIANTS="$1" PRECISIONS="fp32 bf16 fp16" \
    EMBED_REPEAT=10 AGREEMENT_DATA="$DATA" AGREEMENT_N=20 scripts/bench.sh
  cp target/bench/results.jsonl "$OUT/bench.jsonl" 2>/dev/null
}
# Most wanted first, in case the lease runs out: vit_b, serving, then the large variants.
bench vit_b
step loadgen env BIN="$BIN" DEVICE=cuda METRICS_ADDR=127.0.0.1:9190 scripts/loadgen.sh
cp target/loadgen/results.jsonl "$OUT/loadgen.jsonl" 2>/dev/null
cp target/loadgen/metrics.txt "$OUT/metrics.txt" 2>/dev/null
grep skinsam_gpu_memory "$OUT/metrics.txt" 2>/dev/null
bench "vit_l vit_h"
exit 0
