#!/usr/bin/env bash
# A short cargo-fuzz session over the request conversion (fuzz/fuzz_targets/requests.rs), run by
# `make test` (FUZZ_SECONDS, default 60). libFuzzer's coverage-guided search under
# AddressSanitizer (FUZZ_SANITIZER, default address; "none" turns it off), debug assertions on,
# an unoptimised build (about 8 minutes from scratch on 2 cores with ASan, 5 without; 16 for the
# optimised one). The sanitizer flag (-Zsanitizer) is still unstable in rustc, while the stable
# toolchain ships its runtimes (librustc-stable_rt.asan.a): RUSTC_BOOTSTRAP=1 lets this one
# build, and only this one, pass it, since only the stable toolchain can be installed here.
# cargo-fuzz is installed into .tools/ when missing. The corpus grows in fuzz/corpus/
# (git-ignored); a crash or a memory error leaves its input in fuzz/artifacts/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
sanitizer=${FUZZ_SANITIZER:-address}
if ! command -v cargo-fuzz >/dev/null; then
  if [ ! -x .tools/cargo-fuzz/bin/cargo-fuzz ]; then
    cargo install --locked --quiet --root .tools/cargo-fuzz cargo-fuzz --version 0.13.2
  fi
  export PATH="$PWD/.tools/cargo-fuzz/bin:$PATH"
fi
mkdir -p target
log=target/fuzz-requests.log
if RUSTC_BOOTSTRAP=1 cargo fuzz run requests --sanitizer "$sanitizer" --dev --fuzz-dir fuzz -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 > "$log" 2>&1; then
  echo "fuzz (requests, ${seconds} s, sanitizer $sanitizer): $(grep -E '^Done [0-9]+ runs' "$log" || tail -n 1 "$log")"
else
  tail -n 60 "$log"
  echo "fuzz (requests): FAILED, full log in $log; crash inputs in fuzz/artifacts/requests/" >&2
  exit 1
fi
