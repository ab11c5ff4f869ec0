#!/usr/bin/env bash
# Serving benchmark: starts the release server with vit_b (random weights) and the tiny model,
# measures Segment latency/throughput through gRPC at several concurrencies against a cached
# embedding, the same decode in-process, and embedding throughput with and without concurrent
# requests (micro-batching). Writes target/loadgen/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/loadgen
mkdir -p "$out"
: > "$out/results.jsonl"
IMAGE=tests/fixtures/images/ISIC_0024311.png
BOX=71,105,514,409
POINT=289,255
REQUESTS=${REQUESTS:-200}
cargo build --release -q
cat > "$out/server.toml" <<TOML
grpc_addr = "127.0.0.1:50199"
metrics_addr = ""
[[models]]
id = "vit_b"
variant = "vit_b"
[[models]]
id = "tiny"
variant = "tiny"
checkpoint = "tests/fixtures/golden/sam_tiny.pth"
TOML
target/release/skinsam serve --config "$out/server.toml" > "$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  [ "$(target/release/skinsam models --server http://127.0.0.1:50199 2>/dev/null | grep -c Ready)" = 2 ] && break
  sleep 1
done
target/release/skinsam loadgen --server http://127.0.0.1:50199 --model vit_b --image $IMAGE --box $BOX --point $POINT \
  --concurrency 1,8,32 --requests "$REQUESTS" | tee -a "$out/results.jsonl"
target/release/skinsam loadgen --server http://127.0.0.1:50199 --model tiny --image $IMAGE --box $BOX --point $POINT \
  --concurrency 1 --requests 20 --embed-images 32 --embed-concurrency 1,8 | tee -a "$out/results.jsonl"
kill $server; wait $server 2>/dev/null || true
trap - EXIT
target/release/skinsam decode-inproc --variant vit_b --image $IMAGE --box $BOX --point $POINT --n "$REQUESTS" \
  | tee -a "$out/results.jsonl"
