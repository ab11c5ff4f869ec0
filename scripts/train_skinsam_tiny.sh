#!/usr/bin/env bash
# The documented training run of the default model, skinsam_tiny (MODEL_CARD.md), in two stages:
# 1. a random initialisation from the official modules (seed 0), a server hosting it, one Train
#    run on ../shared/data/ham10000 (split by lesion, 10% of the lesions for validation,
#    augmentation, a mix of prompt kinds, AdamW with a cosine schedule), whole model trained;
# 2. from stage 1's best weights, the image encoder frozen (embeddings computed once), a second
#    Train run on the same split that also trains the three multimask outputs and the IoU head
#    (--multimask), the single-mask output training on;
# then stage 2's last weights in fp16 to models/skinsam_tiny.safetensors (WEIGHTS). Everything
# else lands in target/skinsam-tiny/ (OUT). Run again after an interruption, it resumes the
# unfinished stage from its last checkpoint.
# EPOCHS, EPOCHS2, MAX_TRAIN, MAX_VAL (0 = all) shorten it for a trial (with another OUT and
# WEIGHTS); BIN picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ham10000}
out=${OUT:-target/skinsam-tiny}
RUN=${RUN:-skinsam-tiny}
RUN2=${RUN2:-skinsam-tiny-multimask}
PORT=${PORT:-50197}
mkdir -p "$out"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
[ -f "$out/init.pth" ] || .venv/bin/python scripts/make_random_checkpoint.py skinsam_tiny "$out/init.pth" 0
# server_toml FILE MODEL_ID CHECKPOINT: a server hosting one skinsam_tiny model for a Train run.
server_toml() {
  cat > "$1" <<TOML
grpc_addr = "127.0.0.1:$PORT"
metrics_addr = ""
[[models]]
id = "$2"
variant = "skinsam_tiny"
checkpoint = "$3"
[eval]
dataset_roots = ["$(realpath "$DATA")"]
[train]
output_dir = "$out/runs"
TOML
}
server_toml "$out/server.toml" skinsam-tiny-init "$out/init.pth"
S=http://127.0.0.1:$PORT
. scripts/serve-bg.sh
serve_bg $S "$out/server.log" --config "$out/server.toml"
# Both stages: the same split, prompts and prompt mix, and the trial limits.
common=(--val-fraction 0.1 --split-seed 0 --seed 0 --reference-width 600 --mode box_point
  --prompt-mix box_point=0.5,box=0.2,point=0.15,none=0.15
  --max-train-images "${MAX_TRAIN:-0}" --max-val-images "${MAX_VAL:-0}" --progress-every 20)
resume=()
[ -f "$out/runs/$RUN/last.json" ] && resume=(--resume)
"$BIN" train --server $S --base skinsam-tiny-init --dataset "$DATA" --run-id "$RUN" "${resume[@]}" \
  "${common[@]}" \
  --train-image-encoder --train-prompt-encoder --augment \
  --lr 3e-4 --encoder-lr 3e-4 --weight-decay 0.01 --lr-schedule cosine --warmup-steps 100 \
  --batch-size 32 --epochs "${EPOCHS:-7}" --patience 100 --min-delta 0 | tee -a "$out/train.log"
kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true

# Stage 2: a server hosting stage 1's best weights.
server_toml "$out/server2.toml" skinsam-tiny-stage1 "$out/runs/$RUN/best.safetensors"
serve_bg $S "$out/server2.log" --config "$out/server2.toml"
resume=()
[ -f "$out/runs/$RUN2/last.json" ] && resume=(--resume)
"$BIN" train --server $S --base skinsam-tiny-stage1 --dataset "$DATA" --run-id "$RUN2" "${resume[@]}" \
  "${common[@]}" \
  --multimask --train-prompt-encoder \
  --lr 1e-4 --weight-decay 0.01 --lr-schedule cosine --warmup-steps 50 \
  --batch-size 32 --epochs "${EPOCHS2:-4}" --patience 100 --min-delta 0 | tee -a "$out/train.log"
# The last weights, not the "best": best is judged on the single-mask output alone, while this
# stage is for the multimask outputs and the IoU head, which train to the end of the schedule.
"$BIN" convert --variant skinsam_tiny --fp16 "$out/runs/$RUN2/last.safetensors" "${WEIGHTS:-models/skinsam_tiny.safetensors}"
