#!/usr/bin/env bash
# Speed of the default model (BENCHMARKS.md, MODEL_CARD.md): the encoder and one decode against
# the official modules on the same weights (scripts/bench.sh with VARIANTS=skinsam_tiny), then the
# whole Segment call through gRPC on a server with the built-in settings: a new image each call
# (decode, embed, decode the prompt, PNG), and prompts on a cached embedding. Both HAM10000 image
# sizes: a 200x150 copy and a 600x450 original. Writes target/bench-default/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench-default
mkdir -p "$out"
: > "$out/results.jsonl"
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
BIN=$BIN VARIANTS=skinsam_tiny PRECISIONS=fp32 EMBED_REPEAT=${EMBED_REPEAT:-20} scripts/bench.sh | tee -a "$out/results.jsonl"
PORT=${PORT:-50188}
S=http://127.0.0.1:$PORT
. scripts/serve-bg.sh
# The built-in settings (the default model) on another port, without the metrics listener.
SKINSAM__GRPC_ADDR=127.0.0.1:$PORT SKINSAM__METRICS_ADDR="" serve_bg $S "$out/server.log"
# image, box, point (image pixels)
while read -r image box point; do
  "$BIN" loadgen --server $S --model skinsam-tiny --image "$image" --box "$box" --point "$point" \
    --concurrency 1,8 --requests 200 --embed-images 40 --embed-concurrency 1 --segment-new-images \
    | sed "s|^{|{\"image\":\"$image\",|" | tee -a "$out/results.jsonl"
done <<'LIST'
tests/fixtures/images/ISIC_0024306.png 60,2,169,139 110,71
tests/fixtures/images/ISIC_0024311.png 71,105,514,409 289,255
LIST
