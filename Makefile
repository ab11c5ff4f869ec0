# The two set-up commands of the README: `make serve` and `make test`.
# Both first install libtorch (PyPI wheel torch==2.13.0) into .venv when missing.
SHELL := /bin/bash

.PHONY: env serve test bench parity-vit-b loadgen loadgen-decoders helm-check fuzz

env:
	@scripts/setup-env.sh

serve: env
	cargo run --release -- serve

# Rust tests (parity, checkpoints, bad input, predictor, in-process server), then a Python
# client generated from proto/ against the real binary (and promtool on /metrics if installed),
# then the Helm chart checks (scripts/helm-check.sh), then a one-minute cargo-fuzz session over
# the request conversion (scripts/fuzz.sh). `cargo test` builds target/debug/skinsam for the
# integration tests already; a separate `cargo build` would rebuild dependencies without the
# dev-dependencies' features (about 4 minutes) for the same program.
test: env
	cargo test
	.venv/bin/python scripts/python_client_test.py target/debug/skinsam
	scripts/helm-check.sh
	scripts/fuzz.sh

# Speed and memory against the official package, side by side (see BENCHMARKS.md).
bench: env
	scripts/bench.sh

# Serving latency and throughput through gRPC vs in-process (see BENCHMARKS.md).
loadgen: env
	scripts/loadgen.sh

# Decoder threads side by side: servers with decoders = 0 and 2, alternating (see BENCHMARKS.md).
loadgen-decoders: env
	scripts/loadgen_decoders.sh

# Full-size vit_b parity with the official predictor (random weights), by hand, on the CPU with
# each product route (they take different attention code): about 4 minutes.
parity-vit-b: env
	.venv/bin/python scripts/make_golden.py --variant vit_b --out target/golden-vit_b
	cargo run --release -- parity --golden target/golden-vit_b --device cpu --cpu-products matmul
	cargo run --release -- parity --golden target/golden-vit_b --device cpu --cpu-products conv

# The Helm chart: lint (strict), render each example values file, validate the manifests against
# the Kubernetes schemas, and check that bad values are refused. Fetches helm into .tools/.
helm-check:
	scripts/helm-check.sh

# Fuzz the request conversion for longer: FUZZ_SECONDS=600 make fuzz.
fuzz: env
	scripts/fuzz.sh
