#!/usr/bin/env bash
# A short cargo-fuzz session over the request conversion (fuzz/fuzz_targets/requests.rs), run by
# `make test` (FUZZ_SECONDS, default 60). Stable toolchain: libFuzzer's coverage-guided search
# without a sanitizer (sanitizers need nightly), debug assertions on, an unoptimised build
# (about 5 minutes from scratch on 2 cores instead of 16 for the optimised one). cargo-fuzz is
# installed into .tools/ when missing. The corpus grows in fuzz/corpus/ (git-ignored); a crash
# leaves its input in fuzz/artifacts/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
if ! command -v cargo-fuzz >/dev/null; then
  if [ ! -x .tools/cargo-fuzz/bin/cargo-fuzz ]; then
    cargo install --locked --quiet --root .tools/cargo-fuzz cargo-fuzz --version 0.13.2
  fi
  export PATH="$PWD/.tools/cargo-fuzz/bin:$PATH"
fi
mkdir -p target
log=target/fuzz-requests.log
if cargo fuzz run requests --sanitizer none --dev --fuzz-dir fuzz -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 > "$log" 2>&1; then
  echo "fuzz (requests, ${seconds} s): $(grep -E '^Done [0-9]+ runs' "$log" || tail -n 1 "$log")"
else
  tail -n 60 "$log"
  echo "fuzz (requests): FAILED, full log in $log; crash inputs in fuzz/artifacts/requests/" >&2
  exit 1
fi
