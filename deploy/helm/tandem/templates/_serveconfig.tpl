{{/*
The RayService's serveConfigV2: the same file format `tandem serve --config` reads
(cluster/config.py load_app_config, default deploy/serve-config.yaml). Built as data and
written with toYaml, so quoting and number formatting never depend on the template's text.

No secret is written here: the Redis URL comes from $TANDEM_REDIS_URL and the API key from
$TANDEM_API_KEY, both set from Secrets in the pods (see tandem.rayEnv).
*/}}

{{/* Ray custom resource that ties a pool's replicas to its own worker group. */}}
{{- define "tandem.poolResource" -}}
{{- printf "tandem_%s" . -}}
{{- end -}}

{{/* One entry of `deployments`: (dict "ctx" $ "pool" "prefill" "name" "PrefillServer"). */}}
{{- define "tandem.serveDeployment" -}}
{{- $p := index .ctx.Values .pool -}}
{{- $cpus := $p.replicaCpus -}}
{{- if hasKey $p "expertParallel" -}}
{{- /* A worker of N expert-parallel ranks: a Ray CPU per rank at least (and a GPU each, tandem.validate). */ -}}
{{- $ranks := int $p.expertParallel.size -}}
{{- if lt (float64 $cpus) (float64 $ranks) -}}
{{- $cpus = $ranks -}}
{{- end -}}
{{- end -}}
{{- $actor := dict "num_cpus" $cpus "resources" (dict (include "tandem.poolResource" .pool) 1) -}}
{{- if hasKey $p "gpusPerWorker" -}}
{{- $_ := set $actor "num_gpus" (int $p.gpusPerWorker) -}}
{{- end -}}
{{- $d := dict "name" .name "max_ongoing_requests" (int $p.maxOngoingRequests) "graceful_shutdown_timeout_s" $p.gracefulShutdownTimeoutS "ray_actor_options" $actor -}}
{{- $a := $p.autoscaling -}}
{{- if $a.enabled -}}
{{- $cfg := dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "initial_replicas" (int $a.initialReplicas) "target_ongoing_requests" $a.targetOngoingRequests "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS -}}
{{- if $a.policy -}}
{{- $policy := dict "policy_function" $a.policy -}}
{{- if $a.policyKwargs -}}
{{- $_ := set $policy "policy_kwargs" $a.policyKwargs -}}
{{- end -}}
{{- $_ := set $cfg "policy" $policy -}}
{{- end -}}
{{- $_ := set $d "autoscaling_config" $cfg -}}
{{- else -}}
{{- $_ := set $d "num_replicas" (int $p.replicas) -}}
{{- end -}}
{{- toYaml $d -}}
{{- end -}}

{{/* The engine of a GPU pool: the values' engine map plus the device. */}}
{{- define "tandem.engineArgs" -}}
{{- $p := index .ctx.Values .pool -}}
{{- $engine := deepCopy (default (dict) $p.engine) -}}
{{- $_ := set $engine "device" (ternary "cuda" "cpu" (gt (int $p.gpusPerWorker) 0)) -}}
{{- toYaml $engine -}}
{{- end -}}

{{- define "tandem.serveConfig" -}}
{{- $v := .Values -}}
{{- $grpc := dict "host" "0.0.0.0" "port" (int $v.grpc.port) -}}
{{- if $v.grpc.tls.enabled -}}
{{- $_ := set $grpc "tls_cert_file" (printf "%s/tls.crt" (include "tandem.tlsDir" .)) -}}
{{- $_ := set $grpc "tls_key_file" (printf "%s/tls.key" (include "tandem.tlsDir" .)) -}}
{{- $_ := set $grpc "health_port" (int $v.grpc.healthPort) -}}
{{- end -}}
{{- $engine := dict "prefill" (include "tandem.engineArgs" (dict "ctx" . "pool" "prefill") | fromYaml) "decode" (include "tandem.engineArgs" (dict "ctx" . "pool" "decode") | fromYaml) -}}
{{- $ep := dict "prefill" (deepCopy $v.prefill.expertParallel) "decode" (deepCopy $v.decode.expertParallel) -}}
{{- $args := dict "cluster_name" (default (include "tandem.fullname" .) $v.app.clusterName) "model" $v.model.path "redis_url_env" "TANDEM_REDIS_URL" "grpc" $grpc "engine" $engine "expert_parallel" $ep -}}
{{- if $v.model.id -}}
{{- $_ := set $args "model_id" $v.model.id -}}
{{- end -}}
{{- $_ := set $args "api_key_env" (ternary "TANDEM_API_KEY" nil $v.auth.apiKey.enabled) -}}
{{- range $key := list "disagg" "placement" "control_plane" "ingress" "health" -}}
{{- if hasKey $v.app $key -}}
{{- $_ := set $args $key (index $v.app $key) -}}
{{- end -}}
{{- end -}}
{{- $deployments := list
  (include "tandem.serveDeployment" (dict "ctx" . "pool" "ingress" "name" "Ingress") | fromYaml)
  (include "tandem.serveDeployment" (dict "ctx" . "pool" "prefill" "name" "PrefillServer") | fromYaml)
  (include "tandem.serveDeployment" (dict "ctx" . "pool" "decode" "name" "DecodeServer") | fromYaml) -}}
{{- $app := dict "name" "tandem" "import_path" "tandem.cluster.app:build_app" "args" $args "deployments" $deployments -}}
{{- $config := dict "applications" (list $app) -}}
{{- if $v.http.enabled -}}
{{- $_ := set $config "proxy_location" "EveryNode" -}}
{{- $_ := set $config "http_options" (dict "host" "0.0.0.0" "port" (int $v.http.port)) -}}
{{- $_ := set $app "route_prefix" "/" -}}
{{- else -}}
{{- /* Serve's HTTP proxy stays off: clients speak gRPC to the Ingress replicas. */ -}}
{{- $_ := set $config "proxy_location" "Disabled" -}}
{{- $_ := set $app "route_prefix" nil -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}
