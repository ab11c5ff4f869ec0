#!/usr/bin/env bash
# The eleventh session's experiments (MODEL_CARD.md, "What limits it"; reports/experiments/):
# a warm restart of the shipped skinsam_tiny, whole model with the multimask outputs and the IoU
# head, 4 epochs. Measured, not shipped. From the repository root after `cargo build --release`:
#   reports/experiments/warm-restart.sh                          (warm-restart/, run v2)
#   RUN=v3 CLASS_BALANCE=0.5 PORT=50198 reports/experiments/warm-restart.sh
#                                                                (warm-restart-class-balance/)
# Writes to target/skinsam-tiny-$RUN/; run again after an interruption, it resumes.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=../shared/data/ham10000
RUN=${RUN:-v2}
out=target/skinsam-tiny-$RUN
PORT=${PORT:-50199}
mkdir -p "$out"
BIN=$out/skinsam
cp target/release/skinsam "$BIN"
cat > "$out/server.toml" <<TOML
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
[ -f "$out/runs/$RUN/last.json" ] && resume=(--resume)
"$BIN" train --server $S --base skinsam-tiny-shipped --dataset "$DATA" --run-id "$RUN" "${resume[@]}" \
  --val-fraction 0.1 --split-seed 0 --seed 1 --reference-width 600 --mode box_point \
  --prompt-mix box_point=0.5,box=0.2,point=0.15,none=0.15 --progress-every 20 \
  --train-image-encoder --train-prompt-encoder --augment --multimask --class-balance "${CLASS_BALANCE:-0}" \
  --lr 1e-4 --encoder-lr 1e-4 --weight-decay 0.01 --lr-schedule cosine --warmup-steps 100 \
  --batch-size 32 --epochs 4 --patience 100 --min-delta 0 | tee -a "$out/train.log"
