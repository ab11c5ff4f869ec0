#!/usr/bin/env bash
# Serving benchmark: starts the release server with vit_b (random weights) and the tiny model,
# measures Segment latency/throughput through gRPC at several concurrencies against a cached
# embedding, the same decode in-process (also in pairs with gRPC calls), and embedding
# throughput with and without concurrent requests (micro-batching). Writes
# target/loadgen/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/loadgen
mkdir -p "$out"
: > "$out/results.jsonl"
IMAGE=tests/fixtures/images/ISIC_0024311.png
BOX=71,105,514,409
POINT=289,255
REQUESTS=${REQUESTS:-200}
# BIN overrides the binary (no build then); DEVICE the models' device (default auto).
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
# vit_b with the official modules' random initialisation (seed 0), loaded by the server and by
# the in-process side alike: the same weights give the same activations, so the same work.
CKPT=$out/sam_vit_b.pth
[ -f "$CKPT" ] || "${PYTHON:-.venv/bin/python}" scripts/make_random_checkpoint.py vit_b "$CKPT"
cat > "$out/server.toml" <<TOML
grpc_addr = "127.0.0.1:50199"
metrics_addr = "${METRICS_ADDR:-}"
default_device = "${DEVICE:-auto}"
[[models]]
id = "vit_b"
variant = "vit_b"
checkpoint = "$CKPT"
[[models]]
id = "tiny"
variant = "tiny"
checkpoint = "tests/fixtures/golden/sam_tiny.pth"
TOML
: > "$out/server.log"
. scripts/serve-bg.sh
READY_MODELS=2 serve_bg http://127.0.0.1:50199 "$out/server.log" --config "$out/server.toml"
"$BIN" loadgen --server http://127.0.0.1:50199 --model vit_b --image $IMAGE --box $BOX --point $POINT \
  --concurrency 1,8,32 --requests "$REQUESTS" | tee -a "$out/results.jsonl"
"$BIN" loadgen --server http://127.0.0.1:50199 --model tiny --image $IMAGE --box $BOX --point $POINT \
  --concurrency 1 --requests 20 --embed-images 32 --embed-concurrency 1,8 | tee -a "$out/results.jsonl"
# gRPC overhead in pairs: each Segment through the server alternates with the same decode in
# this process, so the VM's drift cancels out of the difference (vit_b, one prompt, PNG).
"$BIN" decode-inproc --variant vit_b --image $IMAGE --box $BOX --point $POINT --n "$REQUESTS" --device "${DEVICE:-auto}" \
  --checkpoint "$CKPT" --server http://127.0.0.1:50199 --paired-model vit_b | tee -a "$out/results.jsonl"
if [ -n "${METRICS_ADDR:-}" ]; then
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
    "http://$METRICS_ADDR/metrics" > "$out/metrics.txt" || true
fi
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
# The same pairs with OpenMP's threads sleeping instead of spin-waiting between parallel regions,
# in the server and here: on 2 cores, this process's spinning threads otherwise slow the server's
# decode (and its own in-process decode gains from them), which inflates the pair difference.
OMP_WAIT_POLICY=PASSIVE READY_MODELS=2 serve_bg http://127.0.0.1:50199 "$out/server.log" --config "$out/server.toml"
OMP_WAIT_POLICY=PASSIVE "$BIN" decode-inproc --variant vit_b --image $IMAGE --box $BOX --point $POINT --n "$REQUESTS" \
  --device "${DEVICE:-auto}" --checkpoint "$CKPT" --server http://127.0.0.1:50199 --paired-model vit_b \
  | "${PYTHON:-.venv/bin/python}" scripts/tag_lines.py omp_wait_policy=PASSIVE | tee -a "$out/results.jsonl"
kill $SERVER_PID; wait $SERVER_PID 2>/dev/null || true
trap - EXIT
"$BIN" decode-inproc --variant vit_b --checkpoint "$CKPT" --image $IMAGE --box $BOX --point $POINT --n "$REQUESTS" \
  --device "${DEVICE:-auto}" | tee -a "$out/results.jsonl"
