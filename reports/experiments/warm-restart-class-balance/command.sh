#!/usr/bin/env bash
# Experiment of the eleventh session (MODEL_CARD.md, "What limits it"; BENCHMARKS.md), kept as
# run: a warm restart of the shipped skinsam_tiny, whole model + multimask + IoU head, 4 epochs,
# lesion types sampled by n(type)^-0.5 (--class-balance 0.5).
# Measured, not shipped. Run from the repository root after `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=../shared/data/ham10000
out=target/skinsam-tiny-v3
PORT=50198
BIN=$out/skinsam
cp target/release/skinsam $BIN
cat > $out/server.toml <<TOML
grpc_addr = "127.0.0.1:$PORT"
metrics_addr = ""
[[models]]
id = "skinsam-tiny-shipped"
variant = "skinsam_tiny"
checkpoint = "$(realpath models/skinsam_tiny.safetensors)"
[eval]
dataset_roots = ["$(realpath $DATA)"]
[train]
output_dir = "$out/runs"
TOML
S=http://127.0.0.1:$PORT
. scripts/serve-bg.sh
serve_bg $S "$out/server.log" --config "$out/server.toml"
resume=()
[ -f "$out/runs/v3/last.json" ] && resume=(--resume)
"$BIN" train --server $S --base skinsam-tiny-shipped --dataset "$DATA" --run-id v3 "${resume[@]}" \
  --val-fraction 0.1 --split-seed 0 --seed 1 --reference-width 600 --mode box_point \
  --prompt-mix box_point=0.5,box=0.2,point=0.15,none=0.15 --progress-every 20 \
  --train-image-encoder --train-prompt-encoder --augment --multimask --class-balance 0.5 \
  --lr 1e-4 --encoder-lr 1e-4 --weight-decay 0.01 --lr-schedule cosine --warmup-steps 100 \
  --batch-size 32 --epochs 4 --patience 100 --min-delta 0 | tee -a "$out/train.log"
