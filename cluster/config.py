"""The cluster's configuration: one YAML file in Ray Serve's own config format.

    proxy_location: Disabled            # Serve's HTTP proxy is not used: gRPC is ours
    applications:
      - name: tandem
        import_path: tandem.cluster.app:build_app
        route_prefix: null
        args: {...}                     # tandem's settings: TandemArgs below
        deployments:                    # Ray's DeploymentSchema, one per deployment
          - name: Ingress | PrefillServer | DecodeServer
            num_replicas: 1             # or autoscaling_config: {...}
            max_ongoing_requests: 64
            ray_actor_options: {num_cpus: 1, num_gpus: 0}

The same file serves `tandem serve` (cluster/serve_cmd.py) and KubeRay's RayService (the
Helm chart embeds it): Ray's ServeDeploySchema validates the Serve part, the pydantic
models below validate `args`, and both are converted once into frozen dataclasses. Every
error names the offending field by its path in the file, for example
`applications[0].args.disagg.transfer_deadline_s: Input should be greater than 0`.

`load_app_config(path, overrides)` is the only loader; command-line flags are
ConfigOverrides, applied to the raw file before validation so they are checked the same
way as the file itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.serve.schema import DeploymentSchema, ServeDeploySchema

from tandem.cluster.api import DEFAULT_GRPC_PORT
from tandem.cluster.api.refusals import RefusalBudgetConfig
from tandem.router.policies import DisaggRule, PrefixAwareConfig
from tandem.workers.disagg.roles import DisaggConfig
from tandem.workers.engine.llm_engine import EngineConfig
from tandem.workers.expert_parallel.config import ExpertParallelConfig

APP_IMPORT_PATH = "tandem.cluster.app:build_app"
INGRESS, PREFILL, DECODE = "Ingress", "PrefillServer", "DecodeServer"
DEPLOYMENT_NAMES: tuple[str, ...] = (INGRESS, PREFILL, DECODE)
# The config `tandem serve` runs when given no --config: deploy/serve-config.yaml, shipped
# as package data of tandem.deploy so that an installed wheel finds it too.
DEFAULT_CONFIG_PATH = resources.files("tandem.deploy").joinpath("serve-config.yaml")
PolicyName = Literal["least_loaded", "round_robin", "prefix_aware"]


class ConfigError(ValueError):
    """The config is invalid; `field` is the path of the offending field in the file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# ------------------------------------------------------------- the `args` schema


class _Strict(BaseModel):
    # Unknown keys are typos: refuse them instead of silently running on defaults.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EngineArgs(_Strict):
    """tandem.workers.engine.llm_engine.EngineConfig; fields left out keep its defaults."""

    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    block_size: int | None = Field(default=None, ge=1)
    kv_cache_tokens: int | None = Field(default=None, ge=1)
    # The share of the GPU's memory the engine may hold, the KV cache taking what weights,
    # activations and graphs leave (vLLM's gpu_memory_utilization). On cuda without
    # kv_cache_tokens, the KV cache is sized from it; elsewhere it has no effect.
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=2)
    enable_prefix_caching: bool | None = None


class EnginePerRole(_Strict):
    prefill: EngineArgs = EngineArgs()
    decode: EngineArgs = EngineArgs()


class ExpertParallelArgs(_Strict):
    """tandem.workers.expert_parallel.config.ExpertParallelConfig of one pool's workers."""

    # Ranks of one worker replica: its MoE experts are split over them (one GPU each on
    # GPUs, one process each). 1: one process, today's engine.
    size: int = Field(default=1, ge=1, le=64)
    placement: Literal["contiguous", "round_robin"] = "contiguous"
    dispatch: Literal["replicated", "all_to_all"] = "replicated"
    timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    start_timeout_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)


class ExpertParallelPerRole(_Strict):
    prefill: ExpertParallelArgs = ExpertParallelArgs()
    decode: ExpertParallelArgs = ExpertParallelArgs()


class GrpcArgs(_Strict):
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=DEFAULT_GRPC_PORT, ge=1, le=65535)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    health_port: int | None = Field(default=None, ge=1, le=65535)
    # Several Ingress replicas on one machine share the port (SO_REUSEPORT); only for a
    # one-host test cluster (ServerConfig.shared_port says why it is off by default).
    shared_port: bool = False


class DisaggArgs(_Strict):
    local_prefill_threshold: int = Field(default=32, ge=0)
    transfer_deadline_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    peer_check_interval_s: float = Field(default=0.25, gt=0, le=60, allow_inf_nan=False)


class PrefixAwareArgs(_Strict):
    """tandem.router.policies.PrefixAwareConfig of one pool (the prefill pool's defaults)."""

    prompt_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    queued_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    kv_weight: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    max_imbalance: int = Field(default=8, ge=0)
    copy_queue_ratio: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class DecodePrefixAwareArgs(PrefixAwareArgs):
    # Decode replicas carry long-lived sequences: their KV in use is their load.
    kv_weight: float = Field(default=0.05, ge=0, allow_inf_nan=False)


class PrefixAwarePoolArgs(_Strict):
    prefill: PrefixAwareArgs = PrefixAwareArgs()
    decode: DecodePrefixAwareArgs = DecodePrefixAwareArgs()


class PlacementArgs(_Strict):
    prefill: PolicyName = "least_loaded"
    decode: PolicyName = "least_loaded"
    prefix_aware: PrefixAwarePoolArgs = PrefixAwarePoolArgs()
    skip_prefill_cached_fraction: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)


class ControlPlaneArgs(_Strict):
    heartbeat_ttl_s: float = Field(default=10.0, ge=0.1, le=3600, allow_inf_nan=False)
    heartbeat_interval_s: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # A record whose heartbeat stopped advancing this long is left out of placement
    # (a stopped worker), long before its TTL; None: 3 heartbeats, at least 1.5 s.
    heartbeat_stale_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    registry_poll_s: float = Field(default=0.5, gt=0, le=60, allow_inf_nan=False)
    metrics_interval_s: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)


class HealthArgs(_Strict):
    # A replica's Serve health check runs its engine check with this timeout: a stuck
    # engine fails it. Serve waits check_timeout_s + HEALTH_REPLY_MARGIN_S for the
    # answer (a stopped process answers nothing: Serve's own timeout decides).
    check_timeout_s: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False)
    # How often Serve checks each replica. Serve replaces a replica after 3 failed
    # checks in a row: a stopped one goes within ~3 x (check_timeout_s + margin).
    check_period_s: float = Field(default=2.0, gt=0, le=600, allow_inf_nan=False)


class IngressArgs(_Strict):
    max_waiting_requests: int = Field(default=256, ge=1)
    health_timeout_s: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    # Admission (tandem.cluster.admission): the time to first token admitted requests are
    # steered to (beyond it, RESOURCE_EXHAUSTED at once), and the backlog of prompt tokens
    # admitted before anything is measured (about what the pools start within
    # max_start_delay_s; slow start grows it from there).
    max_start_delay_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)
    admission_initial_limit_tokens: int = Field(default=4096, ge=1)
    # Refusal budget of each client connection, both fronts (tandem.cluster.api.refusals):
    # refusals for bad input it may receive in a row (0: no budget), and earns back a
    # second; past it, its requests get RESOURCE_EXHAUSTED / 429 unparsed.
    refusal_burst: int = Field(default=32, ge=0)
    refusal_per_s: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    # Stream migration (tandem.cluster.cluster_backend): times one request may move to
    # another decode replica after its replica died or stalled (0: never), and the stall
    # rule: no delta for stall_timeout_s and no answer to an engine ping within
    # stall_ping_timeout_s.
    max_migrations: int = Field(default=2, ge=0, le=16)
    stall_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    stall_ping_timeout_s: float = Field(default=2.0, gt=0, allow_inf_nan=False)


class TandemArgs(_Strict):
    """The `args` of the application: what tandem.cluster.app:build_app receives."""

    cluster_name: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: str | None = None
    model_id: str | None = Field(default=None, min_length=1)
    redis_url: str | None = Field(default=None, min_length=1)
    redis_url_env: str = Field(default="TANDEM_REDIS_URL", min_length=1)
    api_key_env: str | None = Field(default="TANDEM_API_KEY", min_length=1)
    grpc: GrpcArgs = GrpcArgs()
    disagg: DisaggArgs = DisaggArgs()
    placement: PlacementArgs = PlacementArgs()
    engine: EnginePerRole = EnginePerRole()
    expert_parallel: ExpertParallelPerRole = ExpertParallelPerRole()
    control_plane: ControlPlaneArgs = ControlPlaneArgs()
    ingress: IngressArgs = IngressArgs()
    health: HealthArgs = HealthArgs()


# ----------------------------------------------------- the converted settings


@dataclass(frozen=True)
class GrpcSettings:
    host: str
    # Address the Ingress replicas bind ("0.0.0.0" in a pod).
    port: int
    # Bound exclusively: one Ingress replica per node (the chart gives each its pod).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # PEM files; both or neither.
    health_port: int | None = None
    # A plaintext listener serving only grpc.health.v1 (kubelet's grpc probes speak no
    # TLS); None: none.
    shared_port: bool = False
    # Ingress replicas on one machine share the port (SO_REUSEPORT): test clusters only.

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("grpc.tls_cert_file", "tls_cert_file and tls_key_file go together")
        if self.health_port is not None and self.health_port == self.port:
            raise ConfigError("grpc.health_port", "health_port must differ from port")


@dataclass(frozen=True)
class PlacementSettings:
    prefill: str
    # PlacementPolicy name for the prefill pool (router/policies.py POLICY_NAMES).
    decode: str
    # PlacementPolicy name for the decode pool.
    prefill_prefix_aware: PrefixAwareConfig = PrefixAwareConfig()
    decode_prefix_aware: PrefixAwareConfig = PrefixAwareConfig(kv_weight=0.05)
    # The prefix-aware policy's cost weights and imbalance bound, per pool.
    skip_prefill_cached_fraction: float = 0.5
    # The decode replica prefills a prompt it holds at least this fraction of
    # (tandem.router.policies.DisaggRule).


@dataclass(frozen=True)
class ControlPlaneSettings:
    heartbeat_ttl_s: float
    # A worker missing heartbeats this long leaves the registry.
    heartbeat_interval_s: float
    # How often workers refresh their record and load (the load's staleness bound).
    registry_poll_s: float
    # How often an Ingress re-reads the registry into its load view.
    metrics_interval_s: float
    # How often workers update their Prometheus gauges and publish KV events.
    heartbeat_stale_s: float | None = None
    # Readers leave out a record whose heartbeat has not advanced this long (None: the
    # default of `stale_after_s`).

    def __post_init__(self) -> None:
        if not self.heartbeat_interval_s < self.heartbeat_ttl_s:
            raise ConfigError(
                "control_plane.heartbeat_interval_s",
                f"must be below heartbeat_ttl_s ({self.heartbeat_ttl_s}), "
                f"got {self.heartbeat_interval_s}",
            )
        if self.heartbeat_stale_s is not None and not (
            self.heartbeat_interval_s < self.heartbeat_stale_s <= self.heartbeat_ttl_s
        ):
            raise ConfigError(
                "control_plane.heartbeat_stale_s",
                f"must be above heartbeat_interval_s ({self.heartbeat_interval_s}) and at "
                f"most heartbeat_ttl_s ({self.heartbeat_ttl_s}), got {self.heartbeat_stale_s}",
            )

    @property
    def stale_after_s(self) -> float:
        """How long a heartbeat may stand still before readers leave its worker out:
        three missed heartbeats, at least 1.5 s (a loaded host delays heartbeat threads),
        at most the TTL."""
        if self.heartbeat_stale_s is not None:
            return self.heartbeat_stale_s
        return min(self.heartbeat_ttl_s, max(3 * self.heartbeat_interval_s, 1.5))


# What Serve's health_check_timeout_s adds to the engine check's own timeout: the
# replica's failing answer must reach the controller before Serve gives up on it.
HEALTH_REPLY_MARGIN_S = 1.0


@dataclass(frozen=True)
class HealthSettings:
    check_timeout_s: float = 2.0
    # A worker replica's engine check waits this long for its engine loop.
    check_period_s: float = 2.0
    # Serve's health_check_period_s for every deployment.

    def serve_options(self) -> dict[str, float]:
        """Serve deployment options that make Serve's health checks these."""
        return {
            "health_check_period_s": self.check_period_s,
            "health_check_timeout_s": self.check_timeout_s + HEALTH_REPLY_MARGIN_S,
        }


@dataclass(frozen=True)
class TandemSettings:
    """Everything the deployments need, typed; built from TandemArgs in one place."""

    cluster_name: str
    # Key prefix in Redis: several clusters may share one Redis.
    model_dir: Path | None
    # Checkpoint directory; None: the embedded tiny model (made on first use).
    model_id: str | None
    # Name in ListModels; None: the checkpoint directory's name.
    redis_url: str | None = field(repr=False)
    # Control-plane Redis; None: read it from the variable `redis_url_env`. Kept out of
    # repr: it may carry a password.
    redis_url_env: str
    api_key_env: str | None
    # Environment variable holding the gRPC API key; None or unset: no key.
    grpc: GrpcSettings
    disagg: DisaggConfig
    placement: PlacementSettings
    prefill_engine: EngineConfig
    decode_engine: EngineConfig
    control_plane: ControlPlaneSettings
    max_waiting_requests: int
    # Requests an Ingress replica admits before answering RESOURCE_EXHAUSTED.
    health_timeout_s: float
    # How long a health check may wait for an engine loop.
    max_start_delay_s: float = 2.0
    admission_initial_limit_tokens: int = 4096
    refusal_burst: int = 32
    refusal_per_s: float = 4.0
    # Each client connection's budget of refusals for bad input (0: none), and its refill
    # a second (tandem.cluster.api.refusals).
    # Admission's steering bound on the time to first token and its starting backlog
    # limit (tandem.cluster.admission).
    max_migrations: int = 2
    # Times a stream may move off a failed or stalled decode replica (cluster_backend).
    stall_timeout_s: float = 10.0
    stall_ping_timeout_s: float = 2.0
    # A stream is stalled after stall_timeout_s without a delta when its decode replica
    # then fails an engine ping of stall_ping_timeout_s.
    prefill_ep: ExpertParallelConfig = ExpertParallelConfig()
    decode_ep: ExpertParallelConfig = ExpertParallelConfig()
    # Expert parallelism of each pool's workers (size 1: one process per replica).
    health: HealthSettings = HealthSettings()
    # Replica health checks: the engine check's timeout, Serve's check period.

    def __post_init__(self) -> None:
        # The prompt's KV blocks move between the two pools as they are: same block size,
        # same element type (the transfer layer refuses a mismatch too, but only later);
        # and a request the ingress admits must fit both engines' context.
        for name in ("block_size", "dtype", "max_model_len"):
            p, d = getattr(self.prefill_engine, name), getattr(self.decode_engine, name)
            if p != d:
                raise ConfigError(
                    f"engine.decode.{name}",
                    f"must equal engine.prefill.{name} ({p!r}), got {d!r}",
                )

    @classmethod
    def from_args(cls, args: TandemArgs) -> TandemSettings:
        engines = {}
        for role in ("prefill", "decode"):
            given = getattr(args.engine, role).model_dump(exclude_unset=True)
            utilization = given.get("gpu_memory_utilization")
            if utilization is not None and given.get("device") == "cuda" and (
                "kv_cache_tokens" not in given
            ):
                given["kv_cache_tokens"] = None  # sized from the GPU's memory
            try:
                engines[role] = EngineConfig(**given)
            except ValueError as err:
                raise ConfigError(f"engine.{role}", str(err)) from None
        try:
            disagg = DisaggConfig(
                local_prefill_threshold=args.disagg.local_prefill_threshold,
                transfer_deadline_s=args.disagg.transfer_deadline_s,
                peer_check_interval_s=args.disagg.peer_check_interval_s,
            )
        except ValueError as err:
            raise ConfigError("disagg", str(err)) from None
        g = args.grpc
        return cls(
            prefill_ep=ExpertParallelConfig(**args.expert_parallel.prefill.model_dump()),
            decode_ep=ExpertParallelConfig(**args.expert_parallel.decode.model_dump()),
            cluster_name=args.cluster_name,
            model_dir=Path(args.model) if args.model is not None else None,
            model_id=args.model_id,
            redis_url=args.redis_url,
            redis_url_env=args.redis_url_env,
            api_key_env=args.api_key_env,
            grpc=GrpcSettings(
                host=g.host,
                port=g.port,
                tls_cert_file=Path(g.tls_cert_file) if g.tls_cert_file else None,
                tls_key_file=Path(g.tls_key_file) if g.tls_key_file else None,
                health_port=g.health_port,
                shared_port=g.shared_port,
            ),
            disagg=disagg,
            placement=_placement_settings(args.placement, disagg),
            prefill_engine=engines["prefill"],
            decode_engine=engines["decode"],
            control_plane=ControlPlaneSettings(**args.control_plane.model_dump()),
            # every ingress setting under its own name
            **args.ingress.model_dump(),
            health=HealthSettings(**args.health.model_dump()),
        )

    @classmethod
    def from_json(cls, text: str) -> TandemSettings:
        """From the JSON of TandemArgs, as the deployments receive it (parse_args)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError("args", f"not valid JSON ({err})") from None
        return parse_args(data)[0]

    def resolve_redis_url(self) -> str:
        """The Redis URL, from the config or else from the environment variable."""
        url = self.redis_url or os.environ.get(self.redis_url_env)
        if not url:
            raise ConfigError(
                "args.redis_url",
                f"no Redis URL: set args.redis_url or the environment variable "
                f"{self.redis_url_env} (`tandem serve` starts a private Redis when neither "
                "is given)",
            )
        return url

    def resolve_model_dir(self) -> Path:
        """The checkpoint directory; the embedded tiny model is made on first use."""
        from tandem.workers.synthetic.tiny_model import resolve_model_dir

        return resolve_model_dir(self.model_dir)

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        return os.environ.get(self.api_key_env) or None

    def refusal_budget(self) -> RefusalBudgetConfig | None:
        """The fronts' per-connection refusal budget (None: refusal_burst 0, no budget)."""
        if self.refusal_burst == 0:
            return None
        return RefusalBudgetConfig(burst=self.refusal_burst, per_s=self.refusal_per_s)


def _placement_settings(args: PlacementArgs, disagg: DisaggConfig) -> PlacementSettings:
    configs = {}
    for pool in ("prefill", "decode"):
        given = getattr(args.prefix_aware, pool)
        try:
            configs[pool] = PrefixAwareConfig(**given.model_dump())
        except ValueError as err:
            raise ConfigError(f"placement.prefix_aware.{pool}", str(err)) from None
    try:
        DisaggRule(disagg.local_prefill_threshold, args.skip_prefill_cached_fraction)
    except ValueError as err:
        raise ConfigError("placement.skip_prefill_cached_fraction", str(err)) from None
    return PlacementSettings(
        prefill=args.prefill,
        decode=args.decode,
        prefill_prefix_aware=configs["prefill"],
        decode_prefix_aware=configs["decode"],
        skip_prefill_cached_fraction=args.skip_prefill_cached_fraction,
    )


def parse_args(data: Mapping[str, Any], where: str = "args") -> tuple[TandemSettings, str]:
    """Validate application `args`; returns the settings and their canonical JSON (what
    the deployments receive, so nothing of ours is pickled on the way)."""
    try:
        args = TandemArgs.model_validate(dict(data))
    except ValidationError as err:
        raise _config_error(err, where) from None
    try:
        settings = TandemSettings.from_args(args)
    except ConfigError as err:
        raise ConfigError(f"{where}.{err.field}", err.message) from None
    return settings, args.model_dump_json(exclude_unset=True)


# ------------------------------------------------------------------- the file


@dataclass(frozen=True)
class DeploymentSettings:
    """One deployment's Serve options, as Ray's DeploymentSchema validated them."""

    name: str
    schema: DeploymentSchema | None
    # The file's entry; None when the file names no options for this deployment (the
    # code's defaults in cluster/app.py apply).

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options()`: only what the file sets, as Ray
        itself applies a config's deployment overrides."""
        if self.schema is None:
            return {}
        given = self.schema.model_dump(exclude_unset=True)
        given.pop("name")
        return given

    @property
    def num_replicas(self) -> int | str | None:
        """Fixed replica count, "auto", or None when left to the code or autoscaling."""
        return None if self.schema is None else self.options().get("num_replicas")


@dataclass(frozen=True)
class AppConfig:
    source: str
    # Where the config came from (a path), for messages.
    app_name: str
    serve: ServeDeploySchema
    # The whole file as Ray validated it (proxy_location, logging, ...).
    settings: TandemSettings
    args_json: str
    # `args` as validated JSON: the one value every deployment is constructed with.
    deployments: Mapping[str, DeploymentSettings]
    # Keyed by DEPLOYMENT_NAMES, every name present.
    route_prefix: str | None = None
    # The application's HTTP route prefix ("/"); None: no HTTP route.

    @property
    def http_enabled(self) -> bool:
        """Whether Serve's HTTP proxy runs and routes to the Ingress (the OpenAI API)."""
        return self.serve.proxy_location != "Disabled" and self.route_prefix is not None

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API, for clients on this machine."""
        http = self.serve.http_options
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "[::]") else http.host
        return f"http://{host}:{http.port}{(self.route_prefix or '/').rstrip('/')}/v1"


@dataclass(frozen=True)
class ConfigOverrides:
    """Command-line flags that take precedence over the file (None: keep the file's)."""

    prefill_replicas: int | None = None
    decode_replicas: int | None = None
    model: str | None = None
    redis_url: str | None = field(default=None, repr=False)
    grpc_host: str | None = None
    grpc_port: int | None = None
    grpc_tls_cert_file: str | None = None
    grpc_tls_key_file: str | None = None
    # PEM certificate chain and key: the gRPC API speaks TLS only.
    api_key_env: str | None = None
    device: str | None = None
    # Engine device of both pools ("cpu", "cuda").
    http_port: int | None = None
    # Turns the OpenAI-compatible HTTP API on at this port: Serve's proxy (on every node)
    # with the application routed at "/", on the gRPC host unless the file names one.

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A copy of the raw file (parsed YAML) with the overrides written in."""
        out = json.loads(json.dumps(raw))
        apps = out.get("applications")
        if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
            return out  # load_app_config reports the shape error
        app = apps[0]
        args = app.setdefault("args", {})
        if not isinstance(args, dict):
            return out
        if self.model is not None:
            args["model"] = self.model
        if self.redis_url is not None:
            args["redis_url"] = self.redis_url
        if self.api_key_env is not None:
            args["api_key_env"] = self.api_key_env
        for key, value in (
            ("host", self.grpc_host),
            ("port", self.grpc_port),
            ("tls_cert_file", self.grpc_tls_cert_file),
            ("tls_key_file", self.grpc_tls_key_file),
        ):
            if value is not None:
                args.setdefault("grpc", {})[key] = value
        if self.http_port is not None:
            if out.get("proxy_location") in (None, "Disabled"):
                out["proxy_location"] = "EveryNode"
            http = out.get("http_options")
            http = out["http_options"] = dict(http) if isinstance(http, dict) else {}
            http["port"] = self.http_port
            # Serve's own default host is 0.0.0.0: keep HTTP where gRPC listens instead.
            grpc = args.get("grpc") if isinstance(args.get("grpc"), dict) else {}
            if self.grpc_host is not None or "host" not in http:
                http["host"] = self.grpc_host or grpc.get("host") or "127.0.0.1"
            if app.get("route_prefix") is None:
                app["route_prefix"] = "/"
        if self.device is not None:
            for role in ("prefill", "decode"):
                args.setdefault("engine", {}).setdefault(role, {})["device"] = self.device
        for name, count in ((PREFILL, self.prefill_replicas), (DECODE, self.decode_replicas)):
            if count is None:
                continue
            deployments = app.setdefault("deployments", [])
            entry = next((d for d in deployments if d.get("name") == name), None)
            if entry is None:
                entry = {"name": name}
                deployments.append(entry)
            # A fixed count replaces autoscaling: Ray refuses both at once.
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = count
        return out


def load_app_config(
    path: str | os.PathLike | None = None, overrides: ConfigOverrides | None = None
) -> AppConfig:
    """Read, override and validate a config file (default: deploy/serve-config.yaml)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError("", f"{path}: cannot read the config ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path}: not valid YAML ({err})") from None
    return parse_app_config(raw, str(path), overrides)


def parse_app_config(
    raw: object, source: str = "<config>", overrides: ConfigOverrides | None = None
) -> AppConfig:
    """Validate an already parsed config (see load_app_config)."""
    if not isinstance(raw, dict):
        raise ConfigError("", f"{source}: the config must be a mapping with `applications`")
    if overrides is not None:
        raw = overrides.apply(raw)
    try:
        serve = ServeDeploySchema.model_validate(raw)
    except ValidationError as err:
        raise _config_error(err, "") from None
    if len(serve.applications) != 1:
        raise ConfigError(
            "applications", f"exactly one application is served, got {len(serve.applications)}"
        )
    app = serve.applications[0]
    if app.import_path != APP_IMPORT_PATH:
        raise ConfigError(
            "applications[0].import_path", f"must be {APP_IMPORT_PATH!r}, got {app.import_path!r}"
        )
    settings, args_json = parse_args(app.args, "applications[0].args")
    entries: dict[str, DeploymentSchema] = {}
    for i, d in enumerate(app.deployments):
        where = f"applications[0].deployments[{i}].name"
        if d.name not in DEPLOYMENT_NAMES:
            raise ConfigError(where, f"must be one of {list(DEPLOYMENT_NAMES)}, got {d.name!r}")
        if d.name in entries:
            raise ConfigError(where, f"{d.name} is listed twice")
        if "request_router_config" in d.model_fields_set:
            # Pinning placed requests depends on our router; another one would ignore it.
            raise ConfigError(
                f"applications[0].deployments[{i}].request_router_config",
                "is set by tandem (cluster/routing.py) and cannot be overridden",
            )
        entries[d.name] = d
    _check_worker_resources(settings, entries, list(app.deployments))
    deployments = {n: DeploymentSettings(n, entries.get(n)) for n in DEPLOYMENT_NAMES}
    return AppConfig(
        source=source,
        app_name=app.name,
        serve=serve,
        settings=settings,
        args_json=args_json,
        deployments=deployments,
        route_prefix=app.route_prefix,
    )


def worker_actor_options(ep: ExpertParallelConfig, engine: EngineConfig) -> dict[str, Any]:
    """Serve options of a worker deployment of N > 1 expert-parallel ranks: a CPU per rank
    (its processes), and a GPU per rank on CUDA; {} for N = 1 (cluster/app.py's defaults)."""
    if ep.size == 1:
        return {}
    actor: dict[str, Any] = {"num_cpus": ep.size}
    if engine.device == "cuda":
        actor["num_gpus"] = ep.size
    return {"ray_actor_options": actor}


def _check_worker_resources(
    settings: TandemSettings, entries: Mapping[str, DeploymentSchema], order: list
) -> None:
    """A worker deployment whose ray_actor_options the file sets must give each of its
    expert-parallel ranks a CPU, and a GPU on CUDA (exactly one each)."""
    for pool, name in (("prefill", PREFILL), ("decode", DECODE)):
        ep = getattr(settings, f"{pool}_ep")
        entry = entries.get(name)
        if ep.size == 1 or entry is None or "ray_actor_options" not in entry.model_fields_set:
            continue
        where = f"applications[0].deployments[{order.index(entry)}].ray_actor_options"
        actor = entry.ray_actor_options
        gpus = actor.num_gpus or 0
        cpus = actor.num_cpus if actor.num_cpus is not None else 1
        if (getattr(settings, f"{pool}_engine").device == "cuda" or gpus > 0) and gpus != ep.size:
            raise ConfigError(
                f"{where}.num_gpus",
                f"must be {ep.size}, one GPU per rank of expert_parallel.{pool}.size, got {gpus:g}",
            )
        if cpus < ep.size:
            raise ConfigError(
                f"{where}.num_cpus",
                f"must be at least {ep.size}, one per rank of expert_parallel.{pool}.size "
                f"(each rank is a process), got {cpus:g}",
            )


_BRANCH_LABELS = frozenset({"int", "str", "float", "bool", "dict", "list", "none"})


def _config_error(err: ValidationError, prefix: str) -> ConfigError:
    """The first pydantic error as a ConfigError whose field is its path in the file."""
    first = err.errors()[0]
    path = prefix
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.isidentifier() or part in _BRANCH_LABELS:
            # pydantic's labels of union branches ("constrained-int", "str"), not fields.
            continue
        else:
            path += f".{part}" if path else part
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return ConfigError(path, f"{first['msg']}{more}")
