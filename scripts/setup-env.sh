#!/usr/bin/env bash
# Creates .venv with libtorch (the PyPI wheel torch==2.13.0, what tch 0.26 builds against) and
# the official segment-anything package, then links .venv/libtorch to the wheel's torch/ folder,
# where .cargo/config.toml points LIBTORCH. Does nothing when the environment is already current.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sha256sum scripts/requirements.txt | cut -d' ' -f1)
stamp=.venv/.skinsam-requirements
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e .venv/libtorch/lib/libtorch.so ]; then
  exit 0
fi
echo "setting up .venv (PyTorch 2.13.0 wheel with its CUDA libraries, about 5 GB)" >&2
python3 -m venv .venv
.venv/bin/python -m pip install --disable-pip-version-check -q -r scripts/requirements.txt
ln -sfn "$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .venv/libtorch
echo "$want" > "$stamp"
