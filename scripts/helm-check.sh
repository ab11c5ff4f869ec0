#!/usr/bin/env bash
# CI checks of the Helm chart helm/skinsam (no cluster needed):
#   1. `helm lint --strict` with the chart's defaults and each values file (examples and helm/ci);
#   2. `helm template` of each, for the chart's oldest and the newest Kubernetes version, and a
#      client-side `helm install --dry-run` (renders NOTES.txt);
#   3. the rendered manifests validated against the Kubernetes JSON schemas (PyPI
#      kubernetes-validate, --strict: unknown fields are errors), and each rendered config.toml
#      parsed as TOML;
#   4. bad input refused: wrong types and unknown precisions/variants by values.schema.json, a
#      missing required value by the templates with a "required" message.
# helm comes from scripts/fetch-helm.sh (.tools/helm); kubernetes-validate is installed into its
# own small virtual environment, .tools/venv (the checks need neither torch nor .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/skinsam
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0
# The chart's kubeVersion floor (Chart.yaml) and the newest version kubernetes-validate knows.
KUBE_VERSIONS=(1.29.0 1.37.0)
OUT=out/helm-check

helm=$(scripts/fetch-helm.sh)
venv=.tools/venv
if ! "$venv/bin/python" -c 'import kubernetes_validate, sys; sys.exit(kubernetes_validate.__version__ != sys.argv[1])' \
    "${KUBERNETES_VALIDATE#*==}" 2>/dev/null; then
  echo "installing $KUBERNETES_VALIDATE into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$KUBERNETES_VALIDATE" "tomli; python_version < '3.11'"
fi

rm -rf "$OUT"
mkdir -p "$OUT"
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
pass() { echo "ok:   $*"; }

# The values files that must render: the chart's defaults ("") and every example.
good=("" "$CHART"/examples/*.yaml helm/ci/values-coverage.yaml)

for values in "${good[@]}"; do
  name=$(basename "${values:-defaults}" .yaml)
  args=()
  [ -n "$values" ] && args=(-f "$values")
  # Lint mode turns a template's `required`/`fail` into a log line and exits 0: look for them.
  if lint=$("$helm" lint --strict "$CHART" "${args[@]}" 2>&1) \
      && ! grep -qE 'funcMap fail|missing required value' <<<"$lint"; then
    pass "helm lint --strict ($name)"
  else
    fail "helm lint --strict ($name)"; echo "$lint" >&2
  fi
  # The install notes (NOTES.txt) render only on install: a client-side dry run.
  if notes=$("$helm" install skinsam "$CHART" "${args[@]}" --namespace skinsam --dry-run=client 2>&1) \
      && grep -q '^NOTES:' <<<"$notes"; then
    pass "helm install --dry-run=client, NOTES.txt ($name)"
  else
    fail "helm install --dry-run=client ($name)"; echo "$notes" >&2
  fi
  for kv in "${KUBE_VERSIONS[@]}"; do
    rendered="$OUT/$name-k$kv.yaml"
    if ! "$helm" template skinsam "$CHART" "${args[@]}" --namespace skinsam --kube-version "$kv" >"$rendered" 2>"$rendered.err"; then
      fail "helm template ($name, Kubernetes $kv)"; cat "$rendered.err" >&2
      continue
    fi
    # Errors exit non-zero; a kind without a schema is only a warning: allowed for the
    # Prometheus Operator's ServiceMonitor (a CRD), an error for anything else.
    if report=$("$venv/bin/kubernetes-validate" --strict --quiet -k "$kv" "$rendered" 2>&1) \
        && ! grep -v 'kind ServiceMonitor with api version monitoring.coreos.com/v1' <<<"$report" | grep -q .; then
      pass "kubernetes-validate --strict ($name, Kubernetes $kv: $(grep -c '^kind:' "$rendered") objects)"
    else
      fail "kubernetes-validate --strict ($name, Kubernetes $kv)"; echo "$report" >&2
    fi
  done
  # The server's config file: valid TOML with the models of the values.
  if msg=$("$venv/bin/python" - "$OUT/$name-k${KUBE_VERSIONS[0]}.yaml" <<'EOF' 2>&1
import sys, yaml
try:
    import tomllib
except ImportError:
    import tomli as tomllib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"]
assert len(docs) == 1, f"{len(docs)} ConfigMaps"
cfg = tomllib.loads(docs[0]["data"]["config.toml"])
assert cfg["grpc_addr"].startswith("0.0.0.0:"), cfg["grpc_addr"]
assert cfg["models"] and all({"id", "variant", "checkpoint"} <= m.keys() for m in cfg["models"]), cfg["models"]
ids = {m["id"] for m in cfg["models"]}
for a in cfg.get("aliases", []):
    assert {r["model"] for r in a["routes"]} <= ids, a
print(", ".join(sorted(ids)))
EOF
  ); then
    pass "config.toml parses ($name: $msg)"
  else
    fail "config.toml ($name)"; echo "$msg" >&2
  fi
done

# Bad input: helm must refuse each file (lint and template), and say why.
#   file                                 what the error must contain
bad=(
  "helm/ci/bad-type-replicas.yaml       at '/replicaCount': got string, want integer"
  "helm/ci/bad-type-threads.yaml        at '/config/threads': got string, want integer"
  "helm/ci/bad-precision.yaml           at '/config/models/0/precision': value must be one of"
  "helm/ci/bad-variant.yaml             at '/config/models/0/variant': value must be one of"
  "helm/ci/bad-required-checkpoint.yaml config.models[0].checkpoint is required"
  "helm/ci/bad-required-models-volume.yaml models.persistence.enabled or models.fetch.enabled is required"
  "helm/ci/bad-required-token.yaml      auth.token is required"
  "helm/ci/bad-alias-route.yaml         is not in config.models"
  "helm/ci/bad-message-limit.yaml      at '/config/limits/max_message_bytes': minimum: got 65,536, want 131,072"
)
for entry in "${bad[@]}"; do
  file=${entry%% *}
  want=$(sed -E 's/^[^ ]+ +//' <<<"$entry")
  name=$(basename "$file" .yaml)
  if err=$("$helm" template skinsam "$CHART" -f "$file" 2>&1 >/dev/null); then
    fail "helm template accepted $file"
  elif ! grep -qF -- "$want" <<<"$err"; then
    fail "helm template refused $file, but without \"$want\":"; echo "$err" >&2
  else
    pass "refused $name: $(grep -F -- "$want" <<<"$err" | head -1 | sed -E 's/^(- |Error: )//')"
  fi
  # Schema errors fail lint too; lint only logs a template's `required`, so check that it does.
  lint=$("$helm" lint --strict "$CHART" -f "$file" 2>&1) && lint_rc=0 || lint_rc=$?
  if [ "$lint_rc" -eq 0 ] && ! grep -qF -- "$want" <<<"$lint"; then
    fail "helm lint --strict accepted $file silently"; echo "$lint" >&2
  fi
done

if [ "$failures" -ne 0 ]; then
  echo "helm-check: $failures failure(s); rendered manifests in $OUT" >&2
  exit 1
fi
echo "helm-check: all passed ($("$helm" version --short), $KUBERNETES_VALIDATE)"
