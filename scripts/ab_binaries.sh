#!/usr/bin/env bash
# A/B of two skinsam binaries on the vit_b embedding and predict (`skinsam bench`), alternating
# one process each, so this VM's drift lands on both sides. Prints one JSON line per run.
#   OLD=/tmp/skinsam-old NEW=target/release/skinsam scripts/ab_binaries.sh > ab.jsonl
# ROUNDS (default 2), ROUTES (default "matmul conv": settings cpu_products), PRECISION (fp32),
# CHECKPOINT (default target/bench/sam_vit_b.pth, made with random weights when missing).
# The old binary is usually built from the commit before a change:
#   git stash && cargo build --release && cp target/release/skinsam /tmp/skinsam-old && git stash pop
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD:?set OLD to the binary before the change}"
NEW=${NEW:-target/release/skinsam}
ROUNDS=${ROUNDS:-2}
ROUTES=${ROUTES:-"matmul conv"}
PRECISION=${PRECISION:-fp32}
CHECKPOINT=${CHECKPOINT:-target/bench/sam_vit_b.pth}
if [ ! -f "$CHECKPOINT" ]; then
  mkdir -p "$(dirname "$CHECKPOINT")"
  .venv/bin/python scripts/make_random_checkpoint.py vit_b "$CHECKPOINT" >&2
fi
for round in $(seq "$ROUNDS"); do
  for route in $ROUTES; do
    for side in old new; do
      bin=$OLD
      [ "$side" = new ] && bin=$NEW
      r=$("$bin" bench --variant vit_b --checkpoint "$CHECKPOINT" --precision "$PRECISION" \
        --image tests/fixtures/images/ISIC_0024311.png --box 71,105,514,409 --point 289,255 \
        --embed-repeat 2 --predict-repeat 10 --cpu-products "$route" 2>/dev/null | tail -1)
      echo "{\"ab\":\"$side\",\"round\":$round,\"result\":$r}"
    done
  done
done
