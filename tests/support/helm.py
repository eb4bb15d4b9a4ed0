"""The Helm chart rendered offline through Helm's own SDK, and the schemas that check it.

helm-python-sdk binds libhelm_c (Helm's Go SDK behind a C ABI) with ctypes, so no helm
binary and no cluster are involved:

    Chart.render(values, name=..., namespace=...)   `helm template`: the values are coalesced
                                                    with the chart's defaults, checked against
                                                    values.schema.json, the templates run
                                                    (`lookup` finds nothing)
    lint(path, values, strict=True)                 `helm lint --strict`
    Config(...).install(..., dry_run="client")      `helm install --dry-run=client`

Core objects are checked with kubernetes-validate's offline OpenAPI schemas (strict: unknown
fields are errors). The RayService is checked with the openAPIV3Schema of KubeRay's published
CRD, kept as shared test data outside the project and read from there at run time.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "tandem"
# ../shared/data/kuberay from the repository root: never copied into the project.
KUBERAY_CRD_DIR = REPO / ".." / "shared" / "data" / "kuberay"
KUBE_VERSION = "1.31.0"
RELEASE = "tandem"
NAMESPACE = "llm"
# Kinds from API groups outside Kubernetes itself, and where their schema comes from.
CRD_FILES = {("ray.io/v1", "RayService"): "ray.io_rayservices.yaml"}
# Optional objects whose CRDs ship with other projects (Prometheus Operator, Gateway API);
# no schema of theirs is available offline, so tests check their references by hand.
UNSCHEMAED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
}
POD_OWNER_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")


def values_file(name: str) -> dict[str, Any]:
    """A values file of the chart, parsed by Helm's own YAML reader (as `-f` does)."""
    return helm.values_from_yaml((CHART_DIR / name).read_text(encoding="utf-8"))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, recursively for mappings (several -f/--set layered)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Rendered:
    """One rendering of the chart: the values Helm used and the objects it produced."""

    values: dict[str, Any]
    # The chart's defaults coalesced with the overrides, as the templates saw them.
    docs: tuple[dict[str, Any], ...]
    # Every object of every template, in template order.

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if name is None or d["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name or ''}, found {len(found)}")
        return found[0]

    @property
    def rayservice(self) -> dict[str, Any]:
        return self.one("RayService")

    @property
    def serve_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])


def render(chart: helm.Chart, overrides: Mapping[str, Any] | None = None) -> Rendered:
    """Render like `helm template tandem deploy/helm/tandem -n llm` with the overrides."""
    given = dict(overrides) if overrides else None
    manifests = chart.render(given, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = tuple(
        doc
        for path in sorted(manifests)
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(manifests[path])
        if doc
    )
    return Rendered(values=chart.merge_values(given), docs=docs)


def pod_templates(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) for every pod template an object carries."""
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        found = [("head", cluster["headGroupSpec"]["template"])]
        for group in cluster.get("workerGroupSpecs", []):
            found.append((f"group {group['groupName']}", group["template"]))
        return found
    if doc["kind"] in POD_OWNER_KINDS:
        return [(f"{doc['kind']} {doc['metadata']['name']}", doc["spec"]["template"])]
    return []


def worker_group(rendered: Rendered, name: str) -> dict[str, Any]:
    groups = rendered.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return next(g for g in groups if g["groupName"] == name)


def validate_core(doc: Mapping[str, Any]) -> None:
    """Raise when a Kubernetes object breaks the API's schema (unknown fields included)."""
    kubernetes_validate.validate(dict(doc), KUBE_VERSION, strict=True)


def _forbid_unknown_fields(node: Any) -> None:
    # The API server prunes unknown fields of a structural CRD silently (or refuses them under
    # strict field validation); either way a misspelt field never reaches KubeRay, so the
    # tests treat one as an error, like kubernetes-validate's strict mode does for core kinds.
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in node.values():
            _forbid_unknown_fields(child)
    elif isinstance(node, list):
        for child in node:
            _forbid_unknown_fields(child)


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    """A validator for the stored version of a KubeRay CRD, unknown fields forbidden.

    CEL rules (x-kubernetes-validations) are not evaluated: jsonschema has no CEL.
    """
    path = KUBERAY_CRD_DIR / CRD_FILES[(api_version, kind)]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    version = api_version.split("/")[1]
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])
    _forbid_unknown_fields(schema)
    return jsonschema.Draft7Validator(schema)


def errors_of(validator: jsonschema.Draft7Validator, doc: Mapping[str, Any]) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(dict(doc))
    ]


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (an empty selector matches everything)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[op]
        if not ok:
            return False
    return True


def walk(node: Any, path: str = "") -> Iterator[tuple[str, str | int, Any]]:
    """(parent path, key, value) for every entry of nested mappings and lists."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield path, i, value
            yield from walk(value, f"{path}[{i}]")


def text_of(doc: Mapping[str, Any]) -> str:
    """Every string of an object, joined (for searching leaked values)."""
    return json.dumps(doc, sort_keys=True)
