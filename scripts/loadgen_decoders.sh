#!/usr/bin/env bash
# Decoder threads side by side: the vit_b Segment load (scripts/loadgen.sh's, by embedding
# handle, one box + point prompt, PNG mask) against servers with DECODERS threads per model
# ("0 2" by default: the model's own thread decodes vs two decoder threads), the settings
# alternating for ROUNDS rounds in one run so the VM's drift falls on each alike. Writes
# target/loadgen/decoders.jsonl, each line tagged with its decoders and round.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/loadgen
mkdir -p "$out"
: > "$out/decoders.jsonl"
PYTHON=${PYTHON:-.venv/bin/python}
if [ -z "${BIN:-}" ]; then cargo build --release -q; BIN=target/release/skinsam; fi
CKPT=$out/sam_vit_b.pth
[ -f "$CKPT" ] || "$PYTHON" scripts/make_random_checkpoint.py vit_b "$CKPT"
. scripts/serve-bg.sh
for round in $(seq "${ROUNDS:-2}"); do
  for d in ${DECODERS:-0 2}; do
    cat > "$out/decoders.toml" <<TOML
grpc_addr = "127.0.0.1:50199"
metrics_addr = ""
default_device = "${DEVICE:-auto}"
decoders = $d
[[models]]
id = "vit_b"
variant = "vit_b"
checkpoint = "$CKPT"
TOML
    serve_bg http://127.0.0.1:50199 "$out/decoders-server.log" --config "$out/decoders.toml"
    "$BIN" loadgen --server http://127.0.0.1:50199 --model vit_b --image tests/fixtures/images/ISIC_0024311.png \
      --box 71,105,514,409 --point 289,255 --concurrency "${CONCURRENCY:-1,8,32}" --requests "${REQUESTS:-200}" \
      | "$PYTHON" scripts/tag_lines.py "decoders=$d" "round=$round" | tee -a "$out/decoders.jsonl"
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  done
done
trap - EXIT
