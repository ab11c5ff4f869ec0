#!/usr/bin/env bash
# Evaluation speed: images per second for an evaluation that must encode (cold), the same
# evaluation again (embeddings in the memory cache), a re-evaluation with new prompts (another
# seed: decode only), and a fresh server reading the persisted embeddings from disk.
# vit_b with random weights (a saved checkpoint, so that embeddings persist), box+point prompts.
# N images (default 20) of ../shared/data/ham10000. Writes target/bench-eval/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20}
DATA=${DATA:-../shared/data/ham10000}
VARIANT=${VARIANT:-vit_b}
out=target/bench-eval
mkdir -p "$out"
: > "$out/results.jsonl"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
ckpt=target/bench/sam_$VARIANT.pth
if [ ! -f "$ckpt" ]; then
  mkdir -p target/bench
  .venv/bin/python scripts/make_random_checkpoint.py "$VARIANT" "$ckpt"
fi
rm -rf "$out/store"
cat > "$out/server.toml" <<TOML
grpc_addr = "127.0.0.1:50197"
metrics_addr = ""
[[models]]
id = "$VARIANT"
variant = "$VARIANT"
checkpoint = "$ckpt"
[eval]
dataset_roots = ["$(realpath "$DATA")"]
embedding_store = "$out/store"
TOML
. scripts/serve-bg.sh
start_server() { serve_bg http://127.0.0.1:50197 "$out/server.log" --config "$out/server.toml"; }
run() {  # run NAME SEED
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN" eval --server http://127.0.0.1:50197 --model "$VARIANT" --dataset "$DATA" --reference-width 600 \
    --limit "$N" --seed "$2" --quiet --out "$out/report-$1" > /dev/null
  t1=$(date +%s.%N)
  python3 -c "import json,sys; n,s=int(sys.argv[1]),float(sys.argv[3])-float(sys.argv[2]); print(json.dumps({'bench':'eval','variant':sys.argv[5],'run':sys.argv[4],'images':n,'seconds':round(s,3),'images_per_s':round(n/s,3)}))" \
    "$N" "$t0" "$t1" "$1" "$VARIANT" | tee -a "$out/results.jsonl"
}
start_server
run cold 0
run cached_same_prompts 0
run cached_new_prompts 1
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
start_server
run disk_store_new_prompts 2
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
trap - EXIT
