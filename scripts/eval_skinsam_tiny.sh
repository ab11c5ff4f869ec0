#!/usr/bin/env bash
# The default model's figures (MODEL_CARD.md, BENCHMARKS.md): a server with the shipped weights
# (models/skinsam_tiny.safetensors) scores the training run's validation lesions with fresh
# prompts (seed 1) of each kind: box + point, box only (both against the box-ellipse baseline),
# one point only, no prompt, all with the single-mask output; then box + point and one point with
# the paper's protocol (three masks, the one with the highest predicted IoU kept). Reports land in
# reports/skinsam-tiny/<kind>/ and <kind>_multimask/.
# RUN_DIR is the training run (its sidecar holds the split); BIN picks the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ham10000}
RUN_DIR=${RUN_DIR:-target/skinsam-tiny/runs/skinsam-tiny-multimask}
WEIGHTS=${WEIGHTS:-models/skinsam_tiny.safetensors}
out=${OUT:-reports/skinsam-tiny}
PORT=${PORT:-50193}
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
work=target/eval-skinsam-tiny
mkdir -p "$work"
cat > "$work/server.toml" <<TOML
grpc_addr = "127.0.0.1:$PORT"
metrics_addr = ""
[[models]]
id = "skinsam-tiny"
variant = "skinsam_tiny"
checkpoint = "$(realpath "$WEIGHTS")"
[eval]
dataset_roots = ["$(realpath "$DATA")"]
TOML
S=http://127.0.0.1:$PORT
. scripts/serve-bg.sh
serve_bg $S "$work/server.log" --config "$work/server.toml"
common=(--server $S --dataset "$DATA" --val-split-of "$RUN_DIR" --reference-width 600 --seed 1 --quiet)
single=("${common[@]}" --single-mask)
"$BIN" compare "${single[@]}" --model skinsam-tiny --model box-ellipse --mode box_point --out "$out/box_point"
"$BIN" compare "${single[@]}" --model skinsam-tiny --model box-ellipse --mode box --out "$out/box"
"$BIN" eval "${single[@]}" --model skinsam-tiny --mode point --out "$out/point"
"$BIN" eval "${single[@]}" --model skinsam-tiny --mode none --out "$out/none"
"$BIN" eval "${common[@]}" --model skinsam-tiny --mode box_point --out "$out/box_point_multimask"
"$BIN" eval "${common[@]}" --model skinsam-tiny --mode point --out "$out/point_multimask"
