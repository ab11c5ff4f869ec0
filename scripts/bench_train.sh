#!/usr/bin/env bash
# Decoder training speed on cached embeddings: skinsam's trainer step against the same step with
# the official modules in PyTorch (scripts/bench_train_official.py), side by side, batches of 8
# and 64 (BATCHES), vit_b (VARIANT). Writes target/bench-train/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANT=${VARIANT:-vit_b}
BATCHES=${BATCHES:-"8 64"}
STEPS=${STEPS:-20}
out=target/bench-train
mkdir -p "$out"
: > "$out/results.jsonl"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
for b in $BATCHES; do
  .venv/bin/python scripts/bench_train_official.py --variant "$VARIANT" --batch "$b" --steps "$STEPS" | tee -a "$out/results.jsonl"
  "$BIN" train-bench --variant "$VARIANT" --batch "$b" --steps "$STEPS" --device cpu | tee -a "$out/results.jsonl"
done
