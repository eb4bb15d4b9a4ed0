{{/*
Names and labels.
The full name is kept to 40 characters: KubeRay derives the RayCluster, its pods and its head
Service from it and adds suffixes of its own.
*/}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{/* Labels of one component's objects: (dict "ctx" $ "component" "prefill"). */}}
{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of pod templates: without chart and app versions, because a changed Ray pod template
makes KubeRay replace the whole Ray cluster.
*/}}
{{- define "tandem.podLabels" -}}
{{ include "tandem.componentSelector" . }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{- define "tandem.componentSelector" -}}
{{ include "tandem.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The components whose pods are Ray nodes. */}}
{{- define "tandem.rayComponents" -}}
[ray-head, ingress, prefill, decode]
{{- end -}}

{{/* A label selector matching every Ray pod of this release (any RayCluster generation). */}}
{{- define "tandem.rayPodSelector" -}}
matchLabels:
  {{- include "tandem.selectorLabels" . | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values: {{ include "tandem.rayComponents" . }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
Secrets: the chart only ever refers to them. When no existing Secret is named it creates one
with a random value, read back with `lookup` on upgrades so the value stays the same.
*/}}
{{- define "tandem.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "tandem.fullname" .)) .Values.auth.apiKey.existingSecret -}}
{{- end -}}

{{- define "tandem.redisSecretName" -}}
{{- default (printf "%s-redis" (include "tandem.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{/* A random base64 value, or the one already stored: (dict "ctx" $ "name" N "key" K). */}}
{{- define "tandem.persistentRandom" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key -}}
{{- else -}}
{{- randAlphaNum 40 | b64enc -}}
{{- end -}}
{{- end -}}

{{/* Redis address pieces. */}}
{{- define "tandem.redisHost" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- printf "%s-redis.%s.svc" (include "tandem.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.host -}}
{{- end -}}
{{- end -}}

{{- define "tandem.redisPort" -}}
{{- if eq .Values.redis.mode "internal" -}}6379{{- else -}}{{ int .Values.redis.external.port }}{{- end -}}
{{- end -}}

{{- define "tandem.redisScheme" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.tls -}}rediss{{- else -}}redis{{- end -}}
{{- end -}}

{{- define "tandem.redisDb" -}}
{{- if eq .Values.redis.mode "internal" -}}0{{- else -}}{{ int .Values.redis.external.db }}{{- end -}}
{{- end -}}

{{/*
Environment of every Ray container. The Redis password comes from its Secret; the URL is
assembled by the kubelet from it ($(VAR) expansion of an earlier variable), so neither the
manifest nor the Serve config ever holds the password.
*/}}
{{- define "tandem.rayEnv" -}}
- name: TANDEM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redisSecretName" . }}
      key: {{ .Values.redis.auth.secretKey }}
- name: TANDEM_REDIS_URL
  value: {{ printf "%s://:$(TANDEM_REDIS_PASSWORD)@%s:%s/%s" (include "tandem.redisScheme" .) (include "tandem.redisHost" .) (include "tandem.redisPort" .) (include "tandem.redisDb" .) | quote }}
# The root filesystem is read-only: caches go to the /tmp emptyDir.
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: TRITON_CACHE_DIR
  value: /tmp/cache/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/cache/inductor
- name: TANDEM_CACHE_DIR
  value: /tmp/cache/tandem
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end -}}

{{- define "tandem.apiKeyEnv" -}}
- name: TANDEM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.apiKeySecretName" . }}
      key: {{ .Values.auth.apiKey.secretKey }}
{{- end -}}

{{/* Where the gRPC TLS Secret is mounted in the Ingress pods. */}}
{{- define "tandem.tlsDir" -}}/etc/tandem/tls{{- end -}}

{{/*
Cross-field checks JSON Schema cannot express; each message names the values involved.
*/}}
{{- define "tandem.validate" -}}
{{- range $pool := list "ingress" "prefill" "decode" -}}
{{- $p := index $.Values $pool -}}
{{- $a := $p.autoscaling -}}
{{- if and $a.enabled (not $.Values.ray.autoscaler.enabled) -}}
{{- fail (printf "%s.autoscaling.enabled needs ray.autoscaler.enabled: without Ray's autoscaler no pod is added for a new replica (or set %s.replicas and disable autoscaling)" $pool $pool) -}}
{{- end -}}
{{- if $a.enabled -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) must not exceed %s.autoscaling.maxReplicas (%d)" $pool (int $a.minReplicas) $pool (int $a.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $a.initialReplicas) (int $a.minReplicas)) (gt (int $a.initialReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "%s.autoscaling.initialReplicas (%d) must lie within minReplicas..maxReplicas (%d..%d)" $pool (int $a.initialReplicas) (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $pool := list "prefill" "decode" -}}
{{- $p := index $.Values $pool -}}
{{- $ranks := int $p.expertParallel.size -}}
{{- if and (gt (int $p.gpusPerWorker) 0) (ne $ranks (int $p.gpusPerWorker)) -}}
{{- fail (printf "%s.expertParallel.size (%d) must equal %s.gpusPerWorker (%d): each rank of an expert-parallel worker runs on its own GPU" $pool $ranks $pool (int $p.gpusPerWorker)) -}}
{{- end -}}
{{- end -}}
{{- $mount := trimSuffix "/" $.Values.model.mountPath -}}
{{- if not (or (eq $mount (trimSuffix "/" $.Values.model.path)) (hasPrefix (printf "%s/" $mount) $.Values.model.path)) -}}
{{- fail (printf "model.path (%s) must lie under model.mountPath (%s): only that directory is mounted" $.Values.model.path $.Values.model.mountPath) -}}
{{- end -}}
{{- /* Unset fields take EngineConfig's defaults: block size 16, dtype chosen by device. */ -}}
{{- range $field, $unset := dict "block_size" 16 "dtype" "" -}}
{{- $pv := default $unset (index $.Values.prefill.engine $field) -}}
{{- $dv := default $unset (index $.Values.decode.engine $field) -}}
{{- if ne (toString $pv) (toString $dv) -}}
{{- fail (printf "decode.engine.%s (%v) must equal prefill.engine.%s (%v): KV blocks move between the pools unchanged" $field $dv $field $pv) -}}
{{- end -}}
{{- end -}}
{{- if and $.Values.grpc.tls.enabled (not $.Values.grpc.tls.secretName) -}}
{{- fail "grpc.tls.secretName must name a kubernetes.io/tls Secret when grpc.tls.enabled is true" -}}
{{- end -}}
{{- end -}}
