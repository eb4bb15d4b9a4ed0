{{/*
Pod templates of the Ray cluster. KubeRay requires the Ray container to come first; it wraps
the container's command in `ray start` and adds its own probes only where none is given.
*/}}

{{/* Volumes every Ray pod has: writable /tmp and a sized /dev/shm (read-only root). */}}
{{- define "tandem.rayBaseVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end -}}

{{- define "tandem.rayBaseMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end -}}

{{- define "tandem.modelVolume" -}}
- name: model
  {{- if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
  {{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.persistentVolumeClaim.claimName }}
    readOnly: true
  {{- end }}
{{- end -}}

{{- define "tandem.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end -}}

{{/* Scheduling fields shared by every pod template: (dict "ctx" $ "p" <values of the pod>). */}}
{{- define "tandem.scheduling" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- with .p.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .p.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .p.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
A worker group: (dict "ctx" $ "pool" "prefill"). One replica per pod: the pod offers one unit
of the pool's custom resource and every replica of the pool asks for one.
*/}}
{{- define "tandem.workerGroup" -}}
{{- $ctx := .ctx -}}
{{- $v := $ctx.Values -}}
{{- $p := index $v .pool -}}
{{- $gpus := int (default 0 $p.gpusPerWorker) -}}
{{- $a := $p.autoscaling -}}
{{- $min := ternary (int $a.minReplicas) (int $p.replicas) $a.enabled -}}
{{- $max := ternary (int $a.maxReplicas) (int $p.replicas) $a.enabled -}}
{{- $initial := ternary (int $a.initialReplicas) (int $p.replicas) $a.enabled -}}
{{- $resources := deepCopy $p.resources -}}
{{- if gt $gpus 0 -}}
{{- $limits := default (dict) $resources.limits -}}
{{- $_ := set $limits $v.gpuResourceName $gpus -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
- groupName: {{ .pool }}
  replicas: {{ $initial }}
  minReplicas: {{ $min }}
  maxReplicas: {{ $max }}
  resources:
    {{ include "tandem.poolResource" .pool }}: "1"
  rayStartParams:
    object-store-memory: {{ int64 $p.objectStoreMemory | toString | quote }}
    metrics-export-port: {{ int $v.metrics.port | toString | quote }}
  template:
    metadata:
      labels:
        {{- include "tandem.podLabels" (dict "ctx" $ctx "component" .pool) | nindent 8 }}
    spec:
      # Workers never call the Kubernetes API.
      automountServiceAccountToken: false
      securityContext:
        {{- toYaml $v.podSecurityContext | nindent 8 }}
      {{- with include "tandem.scheduling" (dict "ctx" $ctx "p" $p) }}
      {{- . | trim | nindent 6 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "tandem.image" $ctx }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          securityContext:
            {{- toYaml $v.containerSecurityContext | nindent 12 }}
          resources:
            {{- toYaml $resources | nindent 12 }}
          env:
            {{- include "tandem.rayEnv" $ctx | nindent 12 }}
            {{- if and (eq .pool "ingress") $v.auth.apiKey.enabled }}
            {{- include "tandem.apiKeyEnv" $ctx | nindent 12 }}
            {{- end }}
          ports:
            {{- if eq .pool "ingress" }}
            - name: grpc
              containerPort: {{ int $v.grpc.port }}
            {{- if $v.grpc.tls.enabled }}
            - name: grpc-health
              containerPort: {{ int $v.grpc.healthPort }}
            {{- end }}
            {{- if $v.http.enabled }}
            - name: http
              containerPort: {{ int $v.http.port }}
            {{- end }}
            {{- end }}
            - name: metrics
              containerPort: {{ int $v.metrics.port }}
          {{- if eq .pool "ingress" }}
          # Traffic readiness through grpc.health.v1 (cluster/api/health.py): the Ingress
          # replica of this pod answers SERVING for tandem.v1.Tandem only while its engine
          # check passes and it is not draining. kubelet's grpc probe speaks no TLS (and
          # takes a port number, not a name): with TLS on it asks the plaintext health-only
          # port. The timeout is 1 s above the ingress's own health timeout
          # (app.ingress.health_timeout_s), so the ingress's NOT_SERVING, not kubelet's
          # timeout, is what a slow engine check yields.
          readinessProbe:
            grpc:
              port: {{ ternary (int $v.grpc.healthPort) (int $v.grpc.port) $v.grpc.tls.enabled }}
              service: tandem.v1.Tandem
            periodSeconds: 5
            timeoutSeconds: {{ add1 (int (ceil $v.app.ingress.health_timeout_s)) }}
            failureThreshold: 3
          {{- else }}
          # Raylet health (Ray >= 2.53). Set here because KubeRay's default readiness for
          # RayService workers also requires a Serve HTTP proxy on the pod, which tandem's
          # GPU pods do not run.
          readinessProbe:
            httpGet:
              path: /api/healthz
              port: 52365
            initialDelaySeconds: 10
            periodSeconds: 5
            timeoutSeconds: 2
            failureThreshold: 10
          {{- end }}
          volumeMounts:
            {{- include "tandem.rayBaseMounts" . | nindent 12 }}
            {{- include "tandem.modelMount" $ctx | nindent 12 }}
            {{- if and (eq .pool "ingress") $v.grpc.tls.enabled }}
            - name: grpc-tls
              mountPath: {{ include "tandem.tlsDir" $ctx }}
              readOnly: true
            {{- end }}
      volumes:
        {{- include "tandem.rayBaseVolumes" $p | nindent 8 }}
        {{- include "tandem.modelVolume" $ctx | nindent 8 }}
        {{- if and (eq .pool "ingress") $v.grpc.tls.enabled }}
        - name: grpc-tls
          secret:
            secretName: {{ $v.grpc.tls.secretName }}
            defaultMode: 0440
        {{- end }}
{{- end -}}
