{{/* Names and labels. */}}
{{- define "skinsam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skinsam.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "skinsam.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "skinsam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "skinsam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The server pods (Deployment): what the Services and the PodDisruptionBudget select. */}}
{{- define "skinsam.serverSelectorLabels" -}}
{{ include "skinsam.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "skinsam.labels" -}}
helm.sh/chart: {{ include "skinsam.chart" . }}
{{ include "skinsam.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "skinsam.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "skinsam.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "skinsam.image" -}}
{{- $repo := required "image.repository is required: the image built from the repository's Dockerfile" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "skinsam.authSecretName" -}}
{{- default (printf "%s-auth" (include "skinsam.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "skinsam.modelsClaimName" -}}
{{- default (printf "%s-models" (include "skinsam.fullname" .)) .Values.models.persistence.existingClaim }}
{{- end }}

{{- define "skinsam.stateClaimName" -}}
{{- default (printf "%s-state" (include "skinsam.fullname" .)) .Values.state.persistence.existingClaim }}
{{- end }}

{{- define "skinsam.resultsClaimName" -}}
{{- default (printf "%s-%s-results" (include "skinsam.fullname" .) .Values.job.name) .Values.job.results.existingClaim }}
{{- end }}

{{/* Whether a models volume is mounted: a claim, or an emptyDir that the fetch initContainer fills. */}}
{{- define "skinsam.hasModelsVolume" -}}
{{- if or .Values.models.persistence.enabled .Values.models.fetch.enabled }}true{{ end }}
{{- end }}

{{/* The TLS secret is mounted outside /etc/skinsam (a ConfigMap volume cannot hold a mount point). */}}
{{- define "skinsam.tlsDir" -}}/etc/skinsam-tls{{- end }}

{{/*
Checks that need more than the schema: each fails with a message that says what is required.
Included by the ConfigMap, which every render contains.
*/}}
{{- define "skinsam.validate" -}}
{{- $ids := dict }}
{{- range $i, $m := .Values.config.models }}
{{- $id := required (printf "config.models[%d].id is required" $i) $m.id }}
{{- if hasKey $ids $id }}
{{- fail (printf "config.models[%d].id %q is used twice: model ids must be unique" $i $id) }}
{{- end }}
{{- $_ := set $ids $id true }}
{{- $ckpt := required (printf "config.models[%d].checkpoint is required (model %q): a file name on the models volume (%s) or an absolute path" $i $id $.Values.models.mountPath) $m.checkpoint }}
{{- if and (not (hasPrefix "/" $ckpt)) (not (include "skinsam.hasModelsVolume" $)) }}
{{- fail (printf "config.models[%d].checkpoint %q is a relative path: models.persistence.enabled or models.fetch.enabled is required (or give an absolute path)" $i $ckpt) }}
{{- end }}
{{- end }}
{{- if not .Values.config.models }}
{{- fail "config.models is required: at least one model (id, variant, checkpoint)" }}
{{- end }}
{{- range $i, $a := .Values.config.aliases }}
{{- if hasKey $ids $a.name }}
{{- fail (printf "config.aliases[%d].name %q is also a model id" $i $a.name) }}
{{- end }}
{{- range $j, $r := $a.routes }}
{{- if not (hasKey $ids $r.model) }}
{{- fail (printf "config.aliases[%d].routes[%d].model %q is not in config.models" $i $j $r.model) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.models.fetch.enabled (not .Values.models.fetch.files) }}
{{- fail "models.fetch.files is required when models.fetch.enabled: [{name, url, sha256}]" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- $_ := required "auth.token is required when auth.enabled and no auth.existingSecret is given" .Values.auth.token }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $_ := required "tls.secretName is required when tls.enabled: a kubernetes.io/tls Secret" .Values.tls.secretName }}
{{- end }}
{{- if .Values.datasets.enabled }}
{{- $_ := required "datasets.existingClaim is required when datasets.enabled" .Values.datasets.existingClaim }}
{{- end }}
{{- if .Values.job.enabled }}
{{- $_ := required "job.model is required when job.enabled: the model id to evaluate" .Values.job.model }}
{{- if not .Values.job.args }}
{{- $_ := required "job.dataset is required when job.enabled: the dataset path as the server sees it" .Values.job.dataset }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.job.serverUrl) }}
{{- fail "job: the per-pod sidecar server does not speak TLS to its client; with tls.enabled set job.serverUrl" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A model's checkpoint path in the container. */}}
{{- define "skinsam.checkpointPath" -}}
{{- if hasPrefix "/" .checkpoint }}{{ .checkpoint }}{{ else }}{{ printf "%s/%s" (trimSuffix "/" .mountPath) .checkpoint }}{{ end }}
{{- end }}

{{/*
config.toml from .Values.config. Strings go through toJson: a JSON string (and array of strings)
is a valid TOML basic string (array). Numbers through int64 (YAML numbers arrive as floats).
*/}}
{{- define "skinsam.configToml" -}}
{{- $c := .Values.config -}}
# Rendered by the skinsam Helm chart from .Values.config; SKINSAM__* environment variables win.
grpc_addr = {{ printf "0.0.0.0:%d" (int .Values.containerPorts.grpc) | toJson }}
metrics_addr = {{ ternary (printf "0.0.0.0:%d" (int .Values.containerPorts.metrics)) "" .Values.metrics.enabled | toJson }}
default_device = {{ $c.default_device | toJson }}
threads = {{ int64 $c.threads }}
{{- if hasKey $c "decoders" }}
decoders = {{ int64 $c.decoders }}
{{- end }}
log_format = {{ $c.log_format | toJson }}
{{- range $m := $c.models }}

[[models]]
id = {{ $m.id | toJson }}
variant = {{ $m.variant | toJson }}
checkpoint = {{ include "skinsam.checkpointPath" (dict "checkpoint" $m.checkpoint "mountPath" $.Values.models.mountPath) | toJson }}
{{- with $m.device }}
device = {{ . | toJson }}
{{- end }}
{{- with $m.precision }}
precision = {{ . | toJson }}
{{- end }}
{{- if hasKey $m "decoders" }}
decoders = {{ int64 $m.decoders }}
{{- end }}
{{- end }}
{{- range $a := $c.aliases }}

[[aliases]]
name = {{ $a.name | toJson }}
routes = [{{ range $j, $r := $a.routes }}{{ if $j }}, {{ end }}{ model = {{ $r.model | toJson }}, weight = {{ int64 $r.weight }} }{{ end }}]
{{- end }}
{{- with $c.cache }}

[cache]
{{- range $k := keys . | sortAlpha }}
{{- if not (kindIs "invalid" (index $c.cache $k)) }}
{{ $k }} = {{ index $c.cache $k | int64 }}
{{- end }}
{{- end }}
{{- end }}
{{- with $c.limits }}

[limits]
{{- range $k := keys . | sortAlpha }}
{{- if not (kindIs "invalid" (index $c.limits $k)) }}
{{ $k }} = {{ index $c.limits $k | int64 }}
{{- end }}
{{- end }}
{{- end }}
{{- $eval := default dict $c.eval }}
{{- $roots := $eval.dataset_roots }}
{{- if and (not $roots) .Values.datasets.enabled }}
{{- $roots = list .Values.datasets.mountPath }}
{{- end }}
{{- if or $roots $eval.embedding_store }}

[eval]
{{- with $roots }}
dataset_roots = {{ toJson . }}
{{- end }}
{{- with $eval.embedding_store }}
embedding_store = {{ . | toJson }}
{{- end }}
{{- end }}
{{- $train := default dict $c.train }}

[train]
output_dir = {{ default "" $train.output_dir | toJson }}
{{- if .Values.tls.enabled }}

[tls]
cert = {{ printf "%s/tls.crt" (include "skinsam.tlsDir" .) | toJson }}
key = {{ printf "%s/tls.key" (include "skinsam.tlsDir" .) | toJson }}
{{- end }}
{{- end }}

{{/* Environment of a server container: the auth tokens from the Secret, then extraEnv. */}}
{{- define "skinsam.serverEnv" -}}
{{- if .Values.auth.enabled }}
- name: SKINSAM__AUTH__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skinsam.authSecretName" . }}
      key: {{ .Values.auth.tokenKey }}
- name: SKINSAM__AUTH__ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "skinsam.authSecretName" . }}
      key: {{ .Values.auth.adminTokenKey }}
      optional: true
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of a server container. */}}
{{- define "skinsam.serverVolumeMounts" -}}
- name: config
  mountPath: /etc/skinsam
  readOnly: true
{{- if include "skinsam.hasModelsVolume" . }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
- name: state
  mountPath: {{ .Values.state.mountPath }}
- name: tmp
  mountPath: /tmp
{{- if .Values.datasets.enabled }}
- name: datasets
  mountPath: {{ .Values.datasets.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "skinsam.tlsDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod volumes for the server (config, models, state, tmp, datasets, tls, extra). `state` is an emptyDir unless persistence and not .ephemeralState. */}}
{{- define "skinsam.serverVolumes" -}}
{{- $root := .root -}}
- name: config
  configMap:
    name: {{ include "skinsam.fullname" $root }}
{{- if $root.Values.models.persistence.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "skinsam.modelsClaimName" $root }}
{{- else if $root.Values.models.fetch.enabled }}
- name: models
  emptyDir:
    sizeLimit: {{ $root.Values.models.fetch.sizeLimit }}
{{- end }}
{{- if and $root.Values.state.persistence.enabled (not .ephemeralState) }}
- name: state
  persistentVolumeClaim:
    claimName: {{ include "skinsam.stateClaimName" $root }}
{{- else }}
- name: state
  emptyDir:
    sizeLimit: {{ $root.Values.state.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $root.Values.tmpSizeLimit }}
{{- if $root.Values.datasets.enabled }}
- name: datasets
  persistentVolumeClaim:
    claimName: {{ $root.Values.datasets.existingClaim }}
    readOnly: true
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $root.Values.tls.secretName }}
{{- end }}
{{- with $root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Resources of a server container: .Values.resources plus the GPU limit when gpu.enabled. */}}
{{- define "skinsam.serverResources" -}}
{{- $res := deepCopy (default dict .Values.resources) }}
{{- if .Values.gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .Values.gpu.resource (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* A probe: gRPC health of .service, or the TCP port when TLS is on (kubelet gRPC probes are plaintext). */}}
{{- define "skinsam.probe" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ .root.Values.containerPorts.grpc }}
  service: {{ .service | quote }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/* The initContainer that downloads missing checkpoints into the models volume. */}}
{{- define "skinsam.fetchInitContainer" -}}
{{- $f := .Values.models.fetch }}
- name: fetch-models
  image: {{ printf "%s:%s" $f.image.repository $f.image.tag }}
  imagePullPolicy: {{ $f.image.pullPolicy }}
  command:
    - /bin/sh
    - -ec
    - |
      cd {{ .Values.models.mountPath | squote }}
      fetch() {
        if [ -s "$1" ]; then echo "have $1"; return 0; fi
        echo "fetching $1"
        curl -fsSL --retry 5 --retry-connrefused -o "$1.partial" "$2"
        if [ -n "$3" ]; then echo "$3  $1.partial" | sha256sum -c -; fi
        mv "$1.partial" "$1"
      }
      {{- range $f.files }}
      fetch {{ .name | squote }} {{ .url | squote }} {{ default "" .sha256 | squote }}
      {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $f.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.models.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
