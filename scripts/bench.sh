#!/usr/bin/env bash
# Benchmarks SkinSAM against the official segment-anything package in one run, on the same
# machine, image, prompt and random weights. Writes target/bench/results.jsonl and prints it.
# VARIANTS="vit_b vit_l vit_h" (default), PRECISIONS="fp32 bf16" (default), DEVICE=auto;
# BIN and PYTHON override the binary (no build then) and the Python with segment-anything.
# OFFICIAL_MALLOC=1 (default) also times the official package with the glibc allocator settings
# SkinSAM applies to itself at start (skinsam::device::tune_allocator), labelled "official+malloc".
# ROUNDS=N (default 1) runs the official package and SkinSAM in turn N times, one process each,
# so that this VM's drift (up to 40% between minutes) lands on both sides; every line is tagged
# with the run and the round, and scripts/bench_summary.py prints medians and per-round ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS=${VARIANTS:-"vit_b vit_l vit_h"}
PRECISIONS=${PRECISIONS:-"fp32 bf16"}
DEVICE=${DEVICE:-auto}
IMAGE=tests/fixtures/images/ISIC_0024311.png   # a 600x450 HAM10000 original
BOX=71,105,514,409
POINT=289,255
EMBED_REPEAT=${EMBED_REPEAT:-3}
ROUNDS=${ROUNDS:-1}
# CPU_PRODUCTS="auto" (default): how SkinSAM's large CPU products run (settings cpu_products);
# "auto matmul conv" times each route in every round, for an A/B in one run.
CPU_PRODUCTS=${CPU_PRODUCTS:-auto}
RUN_ID=$(date -u +%Y-%m-%dT%H:%M:%SZ)
out=target/bench
mkdir -p "$out"
touch "$out/results.jsonl"
PY=${PYTHON:-.venv/bin/python}
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
# tag ROUND: adds the run id and the round to each JSON line, and appends it to the results.
tag() {
  "$PY" scripts/tag_lines.py "run=$RUN_ID" "round=$1" | tee -a "$out/results.jsonl"
}
for v in $VARIANTS; do
  ckpt="$out/sam_$v.pth"
  if [ ! -f "$ckpt" ]; then
    "$PY" scripts/make_random_checkpoint.py "$v" "$ckpt"
  fi
  for r in $(seq "$ROUNDS"); do
    "$PY" scripts/bench_official.py --device "$DEVICE" --variant "$v" --checkpoint "$ckpt" --embed-repeat "$EMBED_REPEAT" \
      --image $IMAGE --box $BOX --point $POINT | tag "$r"
    if [ "${OFFICIAL_MALLOC:-1}" = 1 ]; then
      MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864 \
        "$PY" scripts/bench_official.py --device "$DEVICE" --variant "$v" --checkpoint "$ckpt" --embed-repeat "$EMBED_REPEAT" \
        --image $IMAGE --box $BOX --point $POINT --label official+malloc | tag "$r"
    fi
    for p in $PRECISIONS; do
      for route in $CPU_PRODUCTS; do
        "$BIN" bench --variant "$v" --checkpoint "$ckpt" --embed-repeat "$EMBED_REPEAT" --image $IMAGE --box $BOX --point $POINT \
          --precision "$p" --device "$DEVICE" --cpu-products "$route" | tag "$r"
      done
    done
  done
  for p in $PRECISIONS; do
    [ "$p" = fp32 ] && continue
    "$BIN" precision-agreement --variant "$v" --checkpoint "$ckpt" --precision "$p" --device "$DEVICE" \
      --data "${AGREEMENT_DATA:-../shared/data/ham10000}" --n "${AGREEMENT_N:-20}" | tag 0
  done
done
"$PY" scripts/bench_summary.py "$out/results.jsonl" "$RUN_ID" >&2  # stdout stays JSON lines
