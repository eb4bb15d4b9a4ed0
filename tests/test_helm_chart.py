"""The Helm chart (deploy/helm/tandem), rendered offline through Helm's own SDK.

Each values set renders once per module. Checks: Helm lint; every core object against the
Kubernetes 1.31 API schema and the RayService against KubeRay's CRD schema (unknown fields
are errors); the serveConfigV2 against an independent construction from the values and
through tandem.cluster.config.load_app_config, the loader of `tandem serve --config`; the worker
groups against the Serve deployments they host; the security defaults of every pod template
(RELIABILITY.md target 15); the NetworkPolicies; secrets only by reference; bad values
refused by values.schema.json with its message, also through an install dry run.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tandem.cluster.config import (
    DECODE,
    INGRESS,
    PREFILL,
    EngineArgs,
    TandemArgs,
    load_app_config,
)
from tests.support.helm import (
    CHART_DIR,
    CRD_FILES,
    NAMESPACE,
    RELEASE,
    UNSCHEMAED,
    Rendered,
    crd_validator,
    deep_merge,
    errors_of,
    pod_templates,
    render,
    selector_matches,
    text_of,
    validate_core,
    values_file,
    walk,
    worker_group,
)

POOLS = {INGRESS: "ingress", PREFILL: "prefill", DECODE: "decode"}
GPU_POOLS = ("prefill", "decode")

_OPTIONS = {
    "http": {"enabled": True},
    "grpc": {"tls": {"enabled": True, "secretName": "tandem-grpc-tls"}},
    "auth": {"apiKey": {"existingSecret": "clients-api-key", "secretKey": "key"}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "expose": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "host": "llm.example.com",
            "tlsSecretName": "llm-example-tls",
            "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"},
        },
        "grpcRoute": {
            "enabled": True,
            "parentRefs": [{"name": "public", "namespace": "gateways"}],
            "hostnames": ["llm.example.com"],
        },
    },
    "model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}},
    "ingress": {"autoscaling": {"enabled": True}},
    "prefill": {
        "autoscaling": {
            "policy": "ray.serve.autoscaling_policy:default_autoscaling_policy",
            "policyKwargs": None,
        }
    },
    "networkPolicy": {
        "clientFrom": [{"namespaceSelector": {"matchLabels": {"team": "llm-clients"}}}]
    },
}
_EXTERNAL_REDIS = {
    "redis": {
        "mode": "external",
        "auth": {"existingSecret": "managed-redis", "secretKey": "password"},
        "external": {
            "host": "redis.internal.example",
            "port": 6380,
            "db": 2,
            "tls": True,
            "cidrs": ["10.20.0.0/16"],
        },
    },
    "auth": {"apiKey": {"enabled": False}},
}

# name -> (values files, extra overrides), applied like `-f a.yaml --set ...`.
VALUE_SETS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "default": ((), {}),
    "gpt-oss-20b": (("values-gpt-oss-20b.yaml",), {}),
    "gpt-oss-120b": (("values-gpt-oss-120b.yaml",), {}),
    # The values file's one-GPU alternative: all experts on one H200.
    "gpt-oss-120b-h200": (
        ("values-gpt-oss-120b.yaml",),
        {
            pool: {
                "gpusPerWorker": 1,
                "expertParallel": {"size": 1},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            }
            for pool in GPU_POOLS
        },
    ),
    "all-options": (("values-gpt-oss-20b.yaml",), _OPTIONS),
    "external-redis": ((), _EXTERNAL_REDIS),
}


def overrides_of(name: str) -> dict[str, Any]:
    files, extra = VALUE_SETS[name]
    merged: dict[str, Any] = {}
    for f in files:
        merged = deep_merge(merged, values_file(f))
    return deep_merge(merged, extra)


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def renderings(chart) -> dict[str, Rendered]:
    return {name: render(chart, overrides_of(name)) for name in VALUE_SETS}


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(request, renderings) -> Rendered:
    return renderings[request.param]


@pytest.fixture(scope="module")
def rayservice_validator():
    return crd_validator("ray.io/v1", "RayService")


def _all_pod_templates(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    return [t for doc in r.docs for t in pod_templates(doc)]


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    # KubeRay runs Ray in the first container.
    return template["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------ Helm itself


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_passes_strictly(name):
    report = helm.lint(CHART_DIR, overrides_of(name), strict=True, kube_version="v1.31.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_bad_values():
    report = helm.lint(CHART_DIR, {"decode": {"replicas": -1}}, strict=True)
    assert any("/decode/replicas" in e for e in report["errors"])


def test_renders_the_expected_objects(renderings):
    kinds = sorted(d["kind"] for d in renderings["default"].docs)
    assert kinds == sorted(
        [
            "RayService",
            "ConfigMap",
            "StatefulSet",
            "Secret",
            "Secret",
            "Service",
            "Service",
            "Service",
            "Service",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
        ]
    )
    extra = sorted(d["kind"] for d in renderings["all-options"].docs)
    for kind in ("ServiceMonitor", "Ingress", "GRPCRoute"):
        assert kind in extra
    # With an existing API key Secret only the Redis password is generated.
    assert [s["metadata"]["name"] for s in renderings["all-options"].of_kind("Secret")] == [
        "tandem-redis"
    ]
    external = renderings["external-redis"]
    assert external.of_kind("StatefulSet") == [] and external.of_kind("Secret") == []


# ------------------------------------------------------------------------ schemas


def test_core_objects_validate_against_the_kubernetes_api(rendered):
    for doc in rendered.docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_FILES or key in UNSCHEMAED:
            continue
        validate_core(doc)


def test_pod_templates_validate_as_core_pod_templates(rendered):
    # The CRD embeds PodTemplateSpec; the core schema checks the same templates once more.
    for where, template in _all_pod_templates(rendered):
        probe = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": where.replace(" ", "-").lower()},
            "template": template,
        }
        validate_core(probe)


def test_rayservice_validates_against_the_kuberay_crd(rendered, rayservice_validator):
    assert errors_of(rayservice_validator, rendered.rayservice) == []


def test_validators_can_fail(renderings, rayservice_validator):
    rs = copy.deepcopy(renderings["default"].rayservice)
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["minReplica"] = 1
    assert errors_of(rayservice_validator, rs)
    svc = copy.deepcopy(renderings["default"].one("Service", RELEASE))
    svc["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(Exception, match="fifty"):
        validate_core(svc)


def test_unschemaed_objects_point_at_rendered_services(renderings):
    r = renderings["all-options"]
    metrics = r.one("Service", f"{RELEASE}-metrics")
    monitor = r.one("ServiceMonitor")
    assert selector_matches(monitor["spec"]["selector"], metrics["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == metrics["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    api = r.one("Service", RELEASE)
    route = r.one("GRPCRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert backend["name"] == api["metadata"]["name"]
    assert backend["port"] in [p["port"] for p in api["spec"]["ports"] if p["name"] == "grpc"]
    ingress = r.one("Ingress")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": RELEASE, "port": {"name": "grpc"}}


# ------------------------------------------------------------ the Serve config


def _expected_serve_config(v: dict[str, Any]) -> dict[str, Any]:
    """The serveConfigV2 the values call for, built here independently of the templates."""

    def deployment(name: str) -> dict[str, Any]:
        pool = POOLS[name]
        p = v[pool]
        actor: dict[str, Any] = {"num_cpus": p["replicaCpus"], "resources": {f"tandem_{pool}": 1}}
        if pool in GPU_POOLS:
            actor["num_gpus"] = p["gpusPerWorker"]
            # A Ray CPU per expert-parallel rank at least.
            actor["num_cpus"] = max(p["replicaCpus"], p["expertParallel"]["size"])
        d = {
            "name": name,
            "max_ongoing_requests": p["maxOngoingRequests"],
            "graceful_shutdown_timeout_s": p["gracefulShutdownTimeoutS"],
            "ray_actor_options": actor,
        }
        a = p["autoscaling"]
        if a["enabled"]:
            d["autoscaling_config"] = {
                "min_replicas": a["minReplicas"],
                "max_replicas": a["maxReplicas"],
                "initial_replicas": a["initialReplicas"],
                "target_ongoing_requests": a["targetOngoingRequests"],
                "upscale_delay_s": a["upscaleDelayS"],
                "downscale_delay_s": a["downscaleDelayS"],
            }
            if a["policy"]:
                d["autoscaling_config"]["policy"] = {"policy_function": a["policy"]}
                if a.get("policyKwargs"):
                    d["autoscaling_config"]["policy"]["policy_kwargs"] = a["policyKwargs"]
        else:
            d["num_replicas"] = p["replicas"]
        return d

    grpc: dict[str, Any] = {"host": "0.0.0.0", "port": v["grpc"]["port"]}
    if v["grpc"]["tls"]["enabled"]:
        grpc["tls_cert_file"] = "/etc/tandem/tls/tls.crt"
        grpc["tls_key_file"] = "/etc/tandem/tls/tls.key"
        grpc["health_port"] = v["grpc"]["healthPort"]
    args: dict[str, Any] = {
        "cluster_name": v["app"]["clusterName"] or RELEASE,
        "model": v["model"]["path"],
        "redis_url_env": "TANDEM_REDIS_URL",
        "api_key_env": "TANDEM_API_KEY" if v["auth"]["apiKey"]["enabled"] else None,
        "grpc": grpc,
        "engine": {
            pool: {**v[pool]["engine"], "device": "cuda" if v[pool]["gpusPerWorker"] else "cpu"}
            for pool in GPU_POOLS
        },
        "expert_parallel": {pool: v[pool]["expertParallel"] for pool in GPU_POOLS},
        **{
            key: v["app"][key]
            for key in ("disagg", "placement", "control_plane", "ingress", "health")
        },
    }
    if v["model"]["id"]:
        args["model_id"] = v["model"]["id"]
    app = {
        "name": "tandem",
        "import_path": "tandem.cluster.app:build_app",
        "route_prefix": "/" if v["http"]["enabled"] else None,
        "args": args,
        "deployments": [deployment(n) for n in (INGRESS, PREFILL, DECODE)],
    }
    config: dict[str, Any] = {"applications": [app]}
    if v["http"]["enabled"]:
        config["proxy_location"] = "EveryNode"
        config["http_options"] = {"host": "0.0.0.0", "port": v["http"]["port"]}
    else:
        config["proxy_location"] = "Disabled"
    return config


def test_serve_config_is_what_the_values_ask_for(rendered):
    assert rendered.serve_config == _expected_serve_config(rendered.values)


def test_serve_config_loads_with_the_app_config_loader(rendered, tmp_path):
    path = tmp_path / "serve-config.yaml"
    path.write_text(rendered.rayservice["spec"]["serveConfigV2"], encoding="utf-8")
    config = load_app_config(path)
    v = rendered.values
    s = config.settings
    assert s.model_dir == Path(v["model"]["path"])
    assert s.grpc.port == v["grpc"]["port"] and s.grpc.host == "0.0.0.0"
    # No secret in the config: the URL and the key come from the pods' environment.
    assert s.redis_url is None
    assert s.redis_url_env == "TANDEM_REDIS_URL"
    for pool in GPU_POOLS:
        engine = getattr(s, f"{pool}_engine")
        assert engine.device == "cuda"
        given = v[pool]["engine"]
        # an explicit size, or (none given) sized from the GPU's memory at start
        assert engine.kv_cache_tokens == given.get("kv_cache_tokens")
        assert engine.gpu_memory_utilization == given.get("gpu_memory_utilization", 0.9)
        assert engine.dtype == v[pool]["engine"]["dtype"]
    for name, pool in POOLS.items():
        options = config.deployments[name].options()
        a = v[pool]["autoscaling"]
        if a["enabled"]:
            got = options["autoscaling_config"]
            assert (got["min_replicas"], got["max_replicas"]) == (
                a["minReplicas"],
                a["maxReplicas"],
            )
        else:
            assert options["num_replicas"] == v[pool]["replicas"]
        assert options["ray_actor_options"]["resources"] == {f"tandem_{pool}": 1}


def test_env_var_names_of_the_config_are_set_in_the_pods(rendered):
    s = rendered.serve_config["applications"][0]["args"]
    for where, template in _all_pod_templates(rendered):
        if where == "head" or where.startswith("group "):
            env = _env(_ray_container(template))
            assert s["redis_url_env"] in env, where
            # Kubernetes expands $(VAR) only from variables defined earlier in the list.
            names = list(env)
            assert names.index("TANDEM_REDIS_PASSWORD") < names.index(s["redis_url_env"])
    ingress_env = _env(_ray_container(worker_group(rendered, "ingress")["template"]))
    if s["api_key_env"] is None:
        assert "TANDEM_API_KEY" not in ingress_env
    else:
        assert ingress_env[s["api_key_env"]]["valueFrom"]["secretKeyRef"]["name"] == (
            rendered.values["auth"]["apiKey"]["existingSecret"] or f"{RELEASE}-api-key"
        )


def test_probes_and_serve_health_checks_agree(rendered, tmp_path):
    """The Ingress pod's readiness probe outwaits the ingress's own health timeout (so a
    slow check answers NOT_SERVING rather than timing out in kubelet), and the Serve
    health checks the app asks for outwait each replica's engine check."""
    path = tmp_path / "serve-config.yaml"
    path.write_text(rendered.rayservice["spec"]["serveConfigV2"], encoding="utf-8")
    s = load_app_config(path).settings
    probe = _ray_container(worker_group(rendered, "ingress")["template"])["readinessProbe"]
    assert probe["grpc"]["service"] == "tandem.v1.Tandem"
    assert probe["timeoutSeconds"] > s.health_timeout_s
    health = rendered.values["app"]["health"]
    assert (s.health.check_timeout_s, s.health.check_period_s) == (
        health["check_timeout_s"],
        health["check_period_s"],
    )
    serve = s.health.serve_options()
    assert serve["health_check_timeout_s"] > s.health.check_timeout_s
    assert serve["health_check_period_s"] == health["check_period_s"]


def test_chart_values_mirror_the_app_args_schema():
    # Keys the chart passes into `args` unchanged must be keys cluster/config.py accepts.
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    engine_keys = set(schema["definitions"]["engine"]["properties"])
    assert engine_keys <= set(EngineArgs.model_fields) - {"device"}
    app = schema["properties"]["app"]["properties"]
    for key in ("disagg", "placement", "control_plane", "ingress", "health"):
        sub = TandemArgs.model_fields[key].annotation
        assert set(app[key]["properties"]) <= set(sub.model_fields), key


# ------------------------------------------------- worker groups and deployments


def test_each_replica_gets_a_pod_of_its_own_pool(rendered):
    v = rendered.values
    cluster = rendered.rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    deployments = {d["name"]: d for d in rendered.serve_config["applications"][0]["deployments"]}
    for name, pool in POOLS.items():
        group = worker_group(rendered, pool)
        (resource,) = deployments[name]["ray_actor_options"]["resources"]
        # The pool's pods offer one unit of the resource each replica needs: one replica per
        # pod, and never on another pool's pods.
        assert group["resources"] == {resource: "1"}
        others = [g for g in cluster["workerGroupSpecs"] if g["groupName"] != pool]
        assert all(resource not in g.get("resources", {}) for g in others)
        a = v[pool]["autoscaling"]
        bounds = (
            (a["minReplicas"], a["maxReplicas"]) if a["enabled"] else (v[pool]["replicas"],) * 2
        )
        assert (group["minReplicas"], group["maxReplicas"]) == bounds
        assert bounds[0] <= group["replicas"] <= bounds[1]
        limits = _ray_container(group["template"])["resources"]["limits"]
        gpus = deployments[name]["ray_actor_options"].get("num_gpus", 0)
        assert limits.get(v["gpuResourceName"], 0) == gpus
        if pool in GPU_POOLS:
            assert gpus == v[pool]["gpusPerWorker"] >= 1


def test_gpu_pools_follow_the_values_files(renderings):
    for name, product, gpus in (
        ("gpt-oss-20b", "NVIDIA-H100-80GB-HBM3", 1),
        ("gpt-oss-120b", "NVIDIA-H100-80GB-HBM3", 2),
        ("gpt-oss-120b-h200", "NVIDIA-H200", 1),
    ):
        r = renderings[name]
        for pool in GPU_POOLS:
            spec = worker_group(r, pool)["template"]["spec"]
            assert spec["nodeSelector"] == {"nvidia.com/gpu.product": product}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                spec["tolerations"]
            )
            assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == gpus
            args = r.serve_config["applications"][0]["args"]
            assert args["model"].endswith(name.removesuffix("-h200"))
            # Every GPU of a worker pod is one expert-parallel rank of its replica.
            assert args["expert_parallel"][pool]["size"] == gpus
            deployment = next(
                d
                for d in r.serve_config["applications"][0]["deployments"]
                if d["name"] == {"prefill": PREFILL, "decode": DECODE}[pool]
            )
            assert deployment["ray_actor_options"]["num_gpus"] == gpus
            assert deployment["ray_actor_options"]["num_cpus"] >= gpus


def test_dev_shm_and_model_volume(rendered):
    v = rendered.values
    for where, template in _all_pod_templates(rendered):
        if not (where == "head" or where.startswith("group ")):
            continue
        pool = "ray-head" if where == "head" else where.split()[1]
        values_of_pod = v["ray"]["head"] if pool == "ray-head" else v[pool]
        volumes = {vol["name"]: vol for vol in template["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in _ray_container(template)["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm == {"medium": "Memory", "sizeLimit": values_of_pod["shmSize"]}
        if pool == "ray-head":
            assert "model" not in volumes
            continue
        model = mounts[v["model"]["mountPath"]]
        assert model["readOnly"] is True
        source = volumes[model["name"]]
        if v["model"]["source"] == "hostPath":
            assert source["hostPath"]["path"] == v["model"]["hostPath"]["path"]
        else:
            assert source["persistentVolumeClaim"] == {
                "claimName": v["model"]["persistentVolumeClaim"]["claimName"],
                "readOnly": True,
            }


def test_services_reach_the_ingress_ports(rendered):
    v = rendered.values
    api = rendered.one("Service", RELEASE)
    ingress = worker_group(rendered, "ingress")["template"]
    assert selector_matches({"matchLabels": api["spec"]["selector"]}, ingress["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in _ray_container(ingress)["ports"]}
    wanted = {"grpc": v["grpc"]["port"]} | (
        {"http": v["http"]["port"]} if v["http"]["enabled"] else {}
    )
    assert {p["name"]: p["port"] for p in api["spec"]["ports"]} == wanted
    for p in api["spec"]["ports"]:
        assert ports[p["targetPort"]] == p["port"]
    # Kubernetes' own gRPC probe of grpc.health.v1 for the API service; with TLS it asks
    # the plaintext health-only port (kubelet's gRPC probe speaks no TLS).
    probe = _ray_container(ingress)["readinessProbe"]["grpc"]
    health_port = v["grpc"]["healthPort"] if v["grpc"]["tls"]["enabled"] else v["grpc"]["port"]
    assert probe == {"port": health_port, "service": "tandem.v1.Tandem"}
    if v["grpc"]["tls"]["enabled"]:
        assert ports["grpc-health"] == health_port
        assert health_port not in [p["port"] for p in api["spec"]["ports"]]


def test_grpc_tls_files_are_mounted_from_the_secret(renderings):
    r = renderings["all-options"]
    args = r.serve_config["applications"][0]["args"]["grpc"]
    template = worker_group(r, "ingress")["template"]
    mounts = {m["name"]: m for m in _ray_container(template)["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in template["spec"]["volumes"]}
    tls_dir = mounts["grpc-tls"]["mountPath"]
    assert args["tls_cert_file"] == f"{tls_dir}/tls.crt"
    assert args["tls_key_file"] == f"{tls_dir}/tls.key"
    assert volumes["grpc-tls"]["secret"]["secretName"] == "tandem-grpc-tls"


def test_gcs_fault_tolerance_uses_the_control_plane_redis(renderings):
    internal = renderings["default"]
    ft = internal.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    redis_service = internal.one("Service", f"{RELEASE}-redis")
    assert ft["redisAddress"] == f"{RELEASE}-redis.{NAMESPACE}.svc:6379"
    assert redis_service["spec"]["ports"][0]["port"] == 6379
    assert ft["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": f"{RELEASE}-redis", "key": "password"}}
    }
    external = renderings["external-redis"]
    ft = external.rayservice["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "rediss://redis.internal.example:6380"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "managed-redis"
    env = _env(_ray_container(worker_group(external, "decode")["template"]))
    assert env["TANDEM_REDIS_URL"]["value"] == (
        "rediss://:$(TANDEM_REDIS_PASSWORD)@redis.internal.example:6380/2"
    )


def test_gcs_fault_tolerance_can_be_turned_off(chart):
    r = render(chart, {"ray": {"gcsFaultTolerance": {"enabled": False}}})
    assert "gcsFaultToleranceOptions" not in r.rayservice["spec"]["rayClusterConfig"]


def test_fixed_size_cluster_without_the_autoscaler(chart, rayservice_validator):
    fixed = {"autoscaling": {"enabled": False}}
    r = render(
        chart,
        {
            "ray": {"autoscaler": {"enabled": False}},
            "prefill": {**fixed, "replicas": 2},
            "decode": {**fixed, "replicas": 3},
        },
    )
    cluster = r.rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster
    assert errors_of(rayservice_validator, r.rayservice) == []
    deployments = {d["name"]: d for d in r.serve_config["applications"][0]["deployments"]}
    for name, count in ((PREFILL, 2), (DECODE, 3)):
        assert deployments[name]["num_replicas"] == count
        assert "autoscaling_config" not in deployments[name]
        group = worker_group(r, POOLS[name])
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == count
    names = [p["metadata"]["name"] for p in r.of_kind("NetworkPolicy")]
    assert f"{RELEASE}-head-apiserver" not in names


# --------------------------------------------------------- security defaults (15)


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (pod.get("securityContext") or {}).get(key)


def _check_container(where: str, pod: dict[str, Any], c: dict[str, Any]) -> None:
    sc = c.get("securityContext") or {}
    assert _effective(pod, c, "runAsNonRoot") is True, where
    assert (_effective(pod, c, "runAsUser") or 0) != 0, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("privileged") in (None, False), where
    assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), where
    assert not (sc.get("capabilities") or {}).get("add"), where
    assert (_effective(pod, c, "seccompProfile") or {}).get("type") == "RuntimeDefault", where


def test_every_pod_template_meets_the_security_defaults(rendered):
    templates = _all_pod_templates(rendered)
    assert len(templates) == (4 if rendered.values["redis"]["mode"] == "external" else 5)
    for where, template in templates:
        pod = template["spec"]
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), where
        volumes = {vol["name"]: vol for vol in pod.get("volumes", [])}
        claims = {"data"} if where.startswith("StatefulSet") else set()
        for c in pod.get("initContainers", []) + pod["containers"]:
            _check_container(f"{where} {c['name']}", pod, c)
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            # The root filesystem is read-only: /tmp must be a writable emptyDir.
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], where
            for m in mounts.values():
                vol = volumes.get(m["name"])
                if m["name"] in claims or (vol and "emptyDir" in vol):
                    continue
                # Everything else (model, config, TLS) is mounted read-only.
                assert m.get("readOnly") is True, f"{where} {m}"
        if where != "head":
            assert pod.get("automountServiceAccountToken") is False, where


def test_autoscaler_sidecar_meets_the_security_defaults(rendered):
    options = rendered.rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]
    head = rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    sidecar = {"name": "autoscaler", "securityContext": options["securityContext"]}
    _check_container("autoscaler", head["spec"], sidecar)
    volumes = {vol["name"]: vol for vol in head["spec"]["volumes"]}
    (tmp,) = [m for m in options["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]


def test_security_check_can_fail(renderings):
    pod = copy.deepcopy(worker_group(renderings["default"], "decode")["template"]["spec"])
    pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    with pytest.raises(AssertionError):
        _check_container("decode", pod, pod["containers"][0])


# --------------------------------------------------------------- NetworkPolicy


def _policies_selecting(r: Rendered, labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p for p in r.of_kind("NetworkPolicy") if selector_matches(p["spec"]["podSelector"], labels)
    ]


def _peer_is_ray_pod_of_release(peer: dict[str, Any], r: Rendered) -> bool:
    if set(peer) != {"podSelector"}:
        return False
    ray_pods = [t["metadata"]["labels"] for _, t in pod_templates(r.rayservice)]
    foreign = dict(ray_pods[0], **{"app.kubernetes.io/instance": "other-release"})
    redis = dict(ray_pods[0], **{"app.kubernetes.io/component": "redis"})
    sel = peer["podSelector"]
    return (
        all(selector_matches(sel, labels) for labels in ray_pods)
        and not selector_matches(sel, foreign)
        and not selector_matches(sel, redis)
    )


def test_network_policies_isolate_every_pod(rendered):
    for where, template in _all_pod_templates(rendered):
        policies = _policies_selecting(rendered, template["metadata"]["labels"])
        types = {t for p in policies for t in p["spec"]["policyTypes"]}
        assert types == {"Ingress", "Egress"}, where


def test_network_policies_allow_only_the_listed_flows(rendered):
    v = rendered.values
    api_ports = {v["grpc"]["port"]} | ({v["http"]["port"]} if v["http"]["enabled"] else set())
    for where, template in _all_pod_templates(rendered):
        component = template["metadata"]["labels"]["app.kubernetes.io/component"]
        policies = _policies_selecting(rendered, template["metadata"]["labels"])
        for rule in [r for p in policies for r in p["spec"].get("ingress", [])]:
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("from") or []
            if component == "redis":
                assert ports == {6379} and peers, where
                assert all(_peer_is_ray_pod_of_release(peer, rendered) for peer in peers)
            elif not ports:
                # All ports: only among this release's Ray pods (Ray, NCCL, KV transfer).
                assert peers and all(_peer_is_ray_pod_of_release(x, rendered) for x in peers)
            elif not peers or peers == v["networkPolicy"]["clientFrom"]:
                # Clients: only the Ingress pods, only the API ports.
                assert component == "ingress" and ports == api_ports, where
            else:
                assert ports in ({8265}, {v["metrics"]["port"]}), where
        for rule in [r for p in policies for r in p["spec"].get("egress", [])]:
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("to") or []
            assert component != "redis", "Redis opens no connections"
            assert peers, where
            if not ports:
                assert all(_peer_is_ray_pod_of_release(peer, rendered) for peer in peers)
            elif ports == {53}:
                assert peers == v["networkPolicy"]["dnsTo"]
            elif any("ipBlock" in peer for peer in peers):
                # The API server for the head's autoscaler, or an external Redis.
                redis_ext = v["redis"]["mode"] == "external" and ports == {
                    v["redis"]["external"]["port"]
                }
                assert redis_ext or (
                    component == "ray-head"
                    and ports == set(v["networkPolicy"]["apiServer"]["ports"])
                ), where
            else:
                assert ports == {6379}, where
                (peer,) = peers
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"


# ------------------------------------------------------------------- secrets


SECRETISH = re.compile(r"password|passwd|secret|api[-_]?key|credential|token$", re.IGNORECASE)
# Keys that name Secrets (or keys in them), never hold their values.
REFERENCE_KEYS = {"existingSecret", "secretKey", "secretName", "tlsSecretName", "imagePullSecrets"}


def test_secrets_reach_pods_only_by_reference(rendered):
    for where, template in _all_pod_templates(rendered):
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                if not SECRETISH.search(e["name"]) and "REDIS_URL" not in e["name"]:
                    continue
                if "valueFrom" in e:
                    assert set(e["valueFrom"]) == {"secretKeyRef"}, (where, e)
                else:
                    # The Redis URL: the password only as a reference to an earlier variable.
                    assert "$(TANDEM_REDIS_PASSWORD)" in e["value"], (where, e)
            assert "envFrom" not in c, where


def test_no_secret_value_outside_secrets(rendered):
    values = [
        base64.b64decode(v).decode()
        for s in rendered.of_kind("Secret")
        for v in s.get("data", {}).values()
    ]
    assert all(len(v) >= 32 for v in values)
    for doc in rendered.docs:
        if doc["kind"] == "Secret":
            continue
        text = text_of(doc)
        assert not any(v in text for v in values), doc["kind"]
    for cm in rendered.of_kind("ConfigMap"):
        assert not re.search(r"requirepass|password", text_of(cm["data"]), re.IGNORECASE)


def test_values_and_schema_hold_no_secret_values():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    sources = {p.name: values_file(p.name) for p in CHART_DIR.glob("values*.yaml")}
    sources["values.schema.json"] = schema["properties"]
    assert len(sources) == 4
    for source, tree in sources.items():
        for parent, key, value in walk(tree):
            if not isinstance(key, str) or not SECRETISH.search(key) or key in REFERENCE_KEYS:
                continue
            # A secret-like key is allowed only as a group of references (auth.apiKey).
            assert isinstance(value, dict), (source, parent, key)
            fields = set(value.get("properties", value))
            assert fields <= {"enabled"} | REFERENCE_KEYS, (source, parent, key)


# ------------------------------------------------------------- bad values


BAD_VALUES = [
    ({"decode": {"replicas": -2}}, "at '/decode/replicas': minimum: got -2, want 1"),
    (
        {"prefill": {"autoscaling": {"minReplicas": -1}}},
        "at '/prefill/autoscaling/minReplicas': minimum: got -1, want 0",
    ),
    ({"model": {"path": None}}, "at '/model': missing property 'path'"),
    ({"model": {"path": ""}}, "at '/model/path': '' does not match pattern '^/.'"),
    (
        {"prefill": {"engine": {"kv_cache_token": 1}}},
        "at '/prefill/engine': additional properties 'kv_cache_token' not allowed",
    ),
    ({"redis": {"mode": "external"}}, "at '/redis/auth/existingSecret': minLength: got 0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
def test_bad_values_fail_with_the_schema_message(chart, overrides, message):
    with pytest.raises(helm.HelmValuesError) as err:
        chart.render(overrides, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)


CROSS_FIELD = [
    (
        {"prefill": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        "prefill.autoscaling.minReplicas (5) must not exceed prefill.autoscaling.maxReplicas (2)",
    ),
    (
        {"decode": {"engine": {"block_size": 32}}},
        "decode.engine.block_size (32) must equal prefill.engine.block_size (16)",
    ),
    (
        {"model": {"path": "/data/gpt-oss-20b"}},
        "model.path (/data/gpt-oss-20b) must lie under model.mountPath (/models)",
    ),
    ({"grpc": {"tls": {"enabled": True}}}, "grpc.tls.secretName must name"),
    (
        {"decode": {"gpusPerWorker": 2}},
        "decode.expertParallel.size (1) must equal decode.gpusPerWorker (2)",
    ),
    (
        {"ray": {"autoscaler": {"enabled": False}}},
        "prefill.autoscaling.enabled needs ray.autoscaler.enabled",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), CROSS_FIELD)
def test_inconsistent_values_fail_with_a_named_message(chart, overrides, message):
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render(overrides, name=RELEASE, namespace=NAMESPACE)
    assert message in str(err.value)


_NO_CLUSTER = yaml.safe_dump(
    {"apiVersion": "v1", "kind": "Config", "clusters": [], "contexts": [], "users": []}
)


def test_install_dry_run_takes_the_values_file_and_refuses_bad_values():
    # `helm install --dry-run=client`: the same install action, nothing sent anywhere.
    with helm.Config(
        kubeconfig_content=_NO_CLUSTER, namespace=NAMESPACE, storage_driver="memory"
    ) as cfg:
        release = cfg.install(
            CHART_DIR, RELEASE, values_file("values-gpt-oss-20b.yaml"), dry_run="client"
        )
        kinds = [d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d]
        assert "RayService" in kinds
        bad = deep_merge(values_file("values-gpt-oss-20b.yaml"), {"prefill": {"replicas": -1}})
        with pytest.raises(helm.HelmError, match=re.escape("at '/prefill/replicas': minimum")):
            cfg.install(CHART_DIR, RELEASE, bad, dry_run="client")
