{{/* redis.conf of the internal Redis; its checksum restarts the pod when it changes. */}}
{{- define "tandem.redisConf" -}}
port 6379
bind * -::*
dir /data
maxmemory {{ .Values.redis.internal.maxmemory }}
# Registry records, KV events and Ray's GCS tables must not vanish under memory pressure.
maxmemory-policy noeviction
{{- if .Values.redis.internal.persistence.enabled }}
appendonly yes
appendfsync everysec
{{- else }}
appendonly no
save ""
{{- end }}
{{- end -}}
