#!/usr/bin/env bash
# The documented fine-tuning run (BENCHMARKS.md): a server with the tiny model, a Train run on
# ../shared/data/ham10000 (split by lesion, box + point prompts in 600-px units), then the A/B
# comparison of the result against its base and the box-ellipse baseline on the run's
# validation images. Everything lands in target/train-ham/.
# MAX_TRAIN / MAX_VAL limit the images (0 = all), EPOCHS, LR, BATCH as named.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/ham10000}
out=target/train-ham
RUN=${RUN:-ham-tiny}
mkdir -p "$out"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
cat > "$out/server.toml" <<TOML
grpc_addr = "127.0.0.1:50196"
metrics_addr = ""
[[models]]
id = "tiny-random"
variant = "tiny"
checkpoint = "tests/fixtures/golden/sam_tiny.pth"
[eval]
dataset_roots = ["$(realpath "$DATA")"]
embedding_store = "$out/store"
[train]
output_dir = "$out/runs"
TOML
S=http://127.0.0.1:50196
. scripts/serve-bg.sh
serve_bg $S "$out/server.log" --config "$out/server.toml"
"$BIN" train --server $S --base tiny-random --dataset "$DATA" --run-id "$RUN" --reference-width 600 --seed 0 \
  --split-seed 0 --lr "${LR:-1e-3}" --batch-size "${BATCH:-16}" --epochs "${EPOCHS:-30}" --patience 3 \
  --max-train-images "${MAX_TRAIN:-0}" --max-val-images "${MAX_VAL:-0}" --quiet | tee "$out/train.log"
"$BIN" compare --server $S --model tiny-random --model "tiny-random-ft-$RUN" --model box-ellipse \
  --dataset "$DATA" --val-split-of "$out/runs/$RUN" --reference-width 600 --seed 1 --single-mask --quiet \
  --out "$out/ab-report" | tee "$out/ab.log"
