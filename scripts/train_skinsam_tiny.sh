#!/usr/bin/env bash
# The documented training run of the default model, skinsam_tiny (MODEL_CARD.md): a random
# initialisation from the official modules (seed 0), a server hosting it, one Train run on
# ../shared/data/ham10000 (split by lesion, 10% of the lesions for validation, augmentation, a
# mix of prompt kinds, AdamW with a cosine schedule), then the fp16 weights written to
# models/skinsam_tiny.safetensors (WEIGHTS). Everything else lands in target/skinsam-tiny/ (OUT).
# Run again after an interruption, it resumes the run from its last checkpoint.
# EPOCHS, MAX_TRAIN, MAX_VAL (0 = all) shorten it for a trial (with another OUT and WEIGHTS);
# BIN picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ham10000}
out=${OUT:-target/skinsam-tiny}
RUN=${RUN:-skinsam-tiny}
PORT=${PORT:-50197}
mkdir -p "$out"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
[ -f "$out/init.pth" ] || .venv/bin/python scripts/make_random_checkpoint.py skinsam_tiny "$out/init.pth" 0
cat > "$out/server.toml" <<TOML
grpc_addr = "127.0.0.1:$PORT"
metrics_addr = ""
[[models]]
id = "skinsam-tiny-init"
variant = "skinsam_tiny"
checkpoint = "$out/init.pth"
[eval]
dataset_roots = ["$(realpath "$DATA")"]
[train]
output_dir = "$out/runs"
TOML
S=http://127.0.0.1:$PORT
. scripts/serve-bg.sh
serve_bg $S "$out/server.log" --config "$out/server.toml"
resume=()
[ -f "$out/runs/$RUN/last.json" ] && resume=(--resume)
"$BIN" train --server $S --base skinsam-tiny-init --dataset "$DATA" --run-id "$RUN" "${resume[@]}" \
  --val-fraction 0.1 --split-seed 0 --seed 0 --reference-width 600 --mode box_point \
  --prompt-mix box_point=0.5,box=0.2,point=0.15,none=0.15 \
  --train-image-encoder --train-prompt-encoder --augment \
  --lr 3e-4 --encoder-lr 3e-4 --weight-decay 0.01 --lr-schedule cosine --warmup-steps 100 \
  --batch-size 32 --epochs "${EPOCHS:-7}" --patience 100 --min-delta 0 \
  --max-train-images "${MAX_TRAIN:-0}" --max-val-images "${MAX_VAL:-0}" --progress-every 20 | tee -a "$out/train.log"
"$BIN" convert --variant skinsam_tiny --fp16 "$out/runs/$RUN/best.safetensors" "${WEIGHTS:-models/skinsam_tiny.safetensors}"
