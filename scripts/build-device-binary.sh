#!/usr/bin/env bash
# Builds a release skinsam for a GPU machine that has its own PyTorch (another version than the
# torch==2.13.0 this project builds against) and no Rust toolchain, for scripts/device-check.sh.
# libtch (torch-sys's C++ glue) must be compiled against that version's headers: a binary built
# against 2.13 loads 2.11's libraries but reads tensor sizes wrongly. tch 0.26's generated glue
# calls a few private ops that older versions lack; those wrappers are replaced by an error.
# Usage: scripts/build-device-binary.sh TORCH_VERSION OUT_BINARY   (e.g. 2.11.0 .dev/skinsam)
set -euo pipefail
cd "$(dirname "$0")/.."
ver=$1; out=$2
work=target/device-torch-$ver
mkdir -p "$work"
if [ ! -d "$work/torch/include" ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work" "torch==$ver"
  unzip -q -o "$work"/torch-"$ver"-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*' -d "$work"
fi
src=$(ls -d ~/.cargo/registry/src/*/torch-sys-0.26.0 | head -1)
rm -rf "$work/torch-sys" && cp -r "$src" "$work/torch-sys"
# Compile once to learn which generated wrappers do not build, then stub those out.
cc_flags=(-std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -fsyntax-only -w -I "$work/torch/include" -I "$work/torch/include/torch/csrc/api/include")
c++ "${cc_flags[@]}" "$work/torch-sys/libtch/torch_api_generated.cpp" 2> "$work/errors.txt" || true
.venv/bin/python - "$work/torch-sys/libtch/torch_api_generated.cpp" "$work/errors.txt" <<'PY'
import re, sys
path, errs = sys.argv[1], open(sys.argv[2]).read()
bad = sorted({int(m) for m in re.findall(r"torch_api_generated\.cpp:(\d+):\d+: error", errs)})
src = open(path).read().split("\n")
starts = set()
for ln in bad:
    i = ln - 1
    while not re.match(r"^\w.*\(.*\{\s*$", src[i]):
        i -= 1
    starts.add(i)
for i in sorted(starts, reverse=True):
    j = i + 1
    while src[j] != "}":
        j += 1
    body = ['  PROTECT(throw std::runtime_error("not in this libtorch version");)']
    if not src[i].startswith("void"):
        body.append("  return 0;")
    src[i + 1:j] = body
open(path, "w").write("\n".join(src))
print(f"stubbed {len(starts)} wrappers")
PY
nv=$(ls -d "$PWD"/.venv/lib/python3.*/site-packages/nvidia/*/lib | tr '\n' ':')
# A copy of the sources, so that the patch does not touch this checkout's Cargo.lock.
rm -rf "$work/src-copy" && mkdir -p "$work/src-copy"
tar --exclude=./target --exclude=./.venv --exclude=./.tools --exclude=./.dev --exclude=./.git -cf - . | tar -xf - -C "$work/src-copy"
(cd "$work/src-copy" && LD_LIBRARY_PATH="${nv%:}" LIBTORCH="$PWD/../torch" LIBTORCH_BYPASS_VERSION_CHECK=1 \
  CARGO_TARGET_DIR="$PWD/../target" cargo build --release --bin skinsam \
  --config "patch.crates-io.torch-sys.path=\"$PWD/../torch-sys\"")
mkdir -p "$(dirname "$out")" && cp "$work/target/release/skinsam" "$out"
echo "built $out against torch $ver"
