"""The Ray Serve application: three deployments, each with its own replicas and resources.

    client ──gRPC──> Ingress (N replicas, one per node: each binds the port exclusively)
    client ──HTTP──> Serve's proxy ──┘ (the OpenAI API, cluster/http/, when enabled)
                       │ ClusterBackend: place, then call decode pinned to d
                       v
                     DecodeServer (M replicas) ──prefill, pinned to p──> PrefillServer (K)
                       │    <════════════ KV blocks (torch.distributed pair) ═══════│
                       └─ JSON deltas back to the ingress

Every call between deployments carries JSON strings only; calls to PrefillServer and
DecodeServer go through PinnedReplicaRouter (cluster/routing.py), which honours the
`tandem_replica` keyword. Each worker replica registers in the Redis registry under its
Serve replica id, heartbeats its load, publishes its KV block events and exports its
metrics (WorkerPresence). A deployment's `check_health` runs a no-op through its engine
loop, so Serve replaces a replica whose engine is stuck.

`build_app(args)` is the import path Ray Serve configs name (tandem.cluster.app:build_app): it
builds with the code's deployment defaults, and Serve applies the config's `deployments`
section on top. `build_application(AppConfig)` applies that section itself, for
`tandem serve`, which deploys with serve.run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from tandem.cluster.api.backend import ModelCard
from tandem.cluster.api.server import ServerConfig, TandemServer
from tandem.cluster.autoscaling import REPORTED_METRICS
from tandem.cluster.cluster_backend import ClusterBackend
from tandem.cluster.config import (
    DECODE,
    INGRESS,
    PREFILL,
    AppConfig,
    TandemSettings,
    parse_args,
    worker_actor_options,
)
from tandem.cluster.http.app import HttpConfig, build_http_app
from tandem.cluster.metrics import IngressMetrics, WorkerMetrics
from tandem.cluster.peer_probe import PrefillPeerProbe
from tandem.cluster.routing import PinnedReplicaRouter
from tandem.workers.control_plane import (
    KVEventPublisher,
    WorkerCapacity,
    WorkerInfo,
    WorkerRegistry,
)
from tandem.workers.disagg.peers import PeerWatch
from tandem.workers.disagg.roles import DecodeWorker, PrefillWorker
from tandem.workers.engine.llm_engine import ModelFacts
from tandem.workers.model.config import load_config
from tandem.workers.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_PINNED = RequestRouterConfig(request_router_class=PinnedReplicaRouter)


def _replica_id() -> str:
    """This replica's Serve id: the registry key and the pin the router matches."""
    return serve.get_replica_context().replica_id.unique_id


class PinMissed(ValueError):
    """A call pinned to one replica reached another: the pinned one is not among the
    caller's routable replicas (it died, or Serve is stopping it)."""


# How long a decode replica skips a prefill peer its pinned call missed: Serve no longer
# routes to it (stopping or dead); a replica only just started is retried after this.
PIN_MISSED_SKIP_S = 5.0


def _check_pin(pin: str, replica_id: str) -> None:
    """Refuse a call pinned to another replica before doing any of its work. A prefill's
    KV ticket names the replica the decode worker paired with; any other replica's KV
    sender would refuse it, but only inside its engine step."""
    if pin and pin != replica_id:
        raise PinMissed(f"call pinned to replica {pin!r} was routed to {replica_id!r}")


def _model_id(settings: TandemSettings) -> str:
    return settings.model_id or settings.resolve_model_dir().name


class WorkerPresence:
    """A worker replica's life in the control plane: its registry record with heartbeats
    (carrying its load), its KV block events, and its Prometheus gauges, refreshed by one
    daemon thread every `metrics_interval_s`.
    """

    def __init__(
        self,
        settings: TandemSettings,
        worker: PrefillWorker | DecodeWorker,
        role: str,
        replica_id: str,
        transfer_endpoint: str = "",
    ) -> None:
        cp = settings.control_plane
        url = settings.resolve_redis_url()
        self._worker = worker
        engine = worker.engine.engine
        capacity = WorkerCapacity(
            max_num_seqs=engine.engine_config.max_num_seqs,
            kv_blocks=tuple(pool.num_blocks for pool in engine.kv.pools),
            block_size=engine.engine_config.block_size,
        )
        info = WorkerInfo(
            replica_id=replica_id,
            role=role,
            model=_model_id(settings),
            capacity=capacity,
            transfer_endpoint=transfer_endpoint,
            load=worker.load(),
        )
        self.registry = WorkerRegistry(url, ttl_s=cp.heartbeat_ttl_s, cluster=settings.cluster_name)
        self.registry.register(info)
        self.registry.start_heartbeats(cp.heartbeat_interval_s, load_fn=worker.load)
        self.events = KVEventPublisher(
            url, replica_id, incarnation=info.incarnation, cluster=settings.cluster_name
        )
        self.metrics = WorkerMetrics(role, replica_id)
        self._interval = cp.metrics_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"tandem-presence-{replica_id}", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self.events.resync_needed:
                    # Readers may have lost events (Redis restarted empty, buffer overflow):
                    # replace this worker's stream with what its cache holds now.
                    self.events.publish_snapshot(self._worker.kv_snapshot())
                else:
                    self.events.publish(self._worker.kv_events())
                self.metrics.update(self._worker.metrics())
            except Exception:  # a failing refresh must not end the worker's presence
                log.exception("refreshing KV events and metrics failed")

    def close(self) -> None:
        """Leave the registry at once (rather than at TTL expiry) and drop the stream."""
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.registry.deregister()
        self.registry.close()
        self.events.close()


class _WorkerServer:
    """What both worker deployments answer besides their role's call."""

    worker: PrefillWorker | DecodeWorker
    presence: WorkerPresence
    replica_id: str
    check_timeout_s: float
    # health.check_timeout_s: how long the engine check waits for the engine loop

    async def check_health(self) -> None:
        """Serve's health check: raising marks the replica unhealthy, and Serve replaces it
        after three in a row. A stuck engine fails within check_timeout_s; a stopped
        process answers nothing, and Serve's own timeout (check_timeout_s plus a margin,
        HealthSettings.serve_options) fails it."""
        if not await self.worker.check_health(self.check_timeout_s):
            raise RuntimeError(
                f"the engine loop of {self.replica_id} did not answer within "
                f"{self.check_timeout_s} s, or failed"
            )

    async def check_engine(self, tandem_replica: str = "") -> bool:
        """The ingress's readiness probe: a no-op through this replica's engine loop.
        Pinned to another replica (Serve no longer routes to that one), it refuses with
        PinMissed rather than answer for it."""
        _check_pin(tandem_replica, self.replica_id)
        return await self.worker.check_health(self.check_timeout_s)

    def metrics(self, tandem_replica: str = "") -> str:
        """This replica's engine figures as JSON, with its replica id (to see where a
        pinned call landed)."""
        return json.dumps({"replica_id": self.replica_id, **self.worker.metrics()})

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The load figures Serve's controller hands the pool's autoscaling policy
        (tandem.cluster.autoscaling.PoolAutoscaler), averaged per replica."""
        figures = self.worker.metrics()
        return {name: float(figures[name]) for name in REPORTED_METRICS}

    async def __del__(self) -> None:
        await asyncio.to_thread(self.presence.close)
        await asyncio.to_thread(self.worker.close)


@serve.deployment(
    name=PREFILL,
    request_router_config=_PINNED,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
)
class PrefillServer(_WorkerServer):
    """Computes prompts and pushes their KV to the decode replica named in each ticket."""

    def __init__(self, args_json: str) -> None:
        # Replicas share the machine: one intra-op thread each, not one per core each.
        torch.set_num_threads(1)
        settings = TandemSettings.from_json(args_json)
        self.replica_id = _replica_id()
        self.check_timeout_s = settings.health.check_timeout_s
        self.worker = PrefillWorker.create(
            settings.resolve_model_dir(),
            settings.prefill_engine,
            self.replica_id,
            ray.util.get_node_ip_address(),
            ep=settings.prefill_ep,
        )
        self.presence = WorkerPresence(settings, self.worker, "prefill", self.replica_id)

    async def prefill(self, request_json: str, tandem_replica: str = "") -> str:
        _check_pin(tandem_replica, self.replica_id)
        return await self.worker.prefill(request_json)


@serve.deployment(
    name=DECODE,
    request_router_config=_PINNED,
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
)
class DecodeServer(_WorkerServer):
    """Runs requests to the end, their prompts prefilled here or on a prefill replica."""

    def __init__(self, args_json: str, prefill: DeploymentHandle) -> None:
        torch.set_num_threads(1)
        settings = TandemSettings.from_json(args_json)
        self.replica_id = _replica_id()
        self.check_timeout_s = settings.health.check_timeout_s
        self._prefill = prefill
        cp = settings.control_plane
        self._peer_registry = WorkerRegistry(
            settings.resolve_redis_url(),
            ttl_s=cp.heartbeat_ttl_s,
            cluster=settings.cluster_name,
            stale_after_s=cp.stale_after_s,
        )
        self.peers = PeerWatch(
            PrefillPeerProbe(self._peer_registry, prefill.app_name, PREFILL),
            settings.disagg.peer_check_interval_s,
        )
        self.worker = DecodeWorker.create(
            settings.resolve_model_dir(),
            settings.decode_engine,
            self.replica_id,
            ray.util.get_node_ip_address(),
            settings.disagg,
            self.peers,
            ep=settings.decode_ep,
        )
        self.presence = WorkerPresence(
            settings,
            self.worker,
            "decode",
            self.replica_id,
            transfer_endpoint=self.worker.transfer_endpoint,
        )

    async def generate(
        self, request_json: str, prefill_replica: str = "", tandem_replica: str = ""
    ) -> AsyncIterator[str]:
        """Stream JSON deltas (tandem.workers.disagg.roles.encode_delta); `prefill_replica`
        names the prefill replica placement chose, "" to prefill here."""
        self.peers.start()  # on the replica's event loop (idempotent)
        prefill = self._pinned_prefill(prefill_replica) if prefill_replica else None
        async for delta in self.worker.generate(request_json, prefill, prefill_replica):
            yield delta

    def _pinned_prefill(self, replica: str) -> Callable[[str], Awaitable[str]]:
        async def call(request_json: str) -> str:
            response = self._prefill.prefill.remote(request_json, tandem_replica=replica)
            try:
                return await response
            except asyncio.CancelledError:
                # Awaiting a response does not cancel the remote call; this does.
                response.cancel()
                raise
            except RayActorError:
                self.peers.mark_gone(replica)  # it died under the call
                raise
            except PinMissed:
                self.peers.mark_gone(replica, PIN_MISSED_SKIP_S)
                raise

        return call

    async def __del__(self) -> None:
        await self.peers.close()
        await asyncio.to_thread(self._peer_registry.close)
        await super().__del__()


@serve.deployment(
    name=INGRESS,
    # gRPC clients speak to the replica's own server; HTTP requests come through Serve's
    # proxy, and each open stream holds one of max_ongoing_requests for its whole life
    # (admission beyond the engine's queue is the backend's 429, not Serve's queue).
    # Pinning lets an operator ask one replica in particular.
    request_router_config=_PINNED,
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress()
class Ingress:
    """Runs the gRPC API (cluster/api/server.py) on this replica's event loop, and
    answers the OpenAI-compatible HTTP API (cluster/http/) that Serve's HTTP proxy routes
    here (when the config enables the proxy and gives the app a route prefix)."""

    async def __init__(self, args_json: str, decode: DeploymentHandle) -> None:
        torch.set_num_threads(1)
        settings = TandemSettings.from_json(args_json)
        replica_id = _replica_id()
        model_dir = settings.resolve_model_dir()
        config = load_config(model_dir)
        facts = ModelFacts.read(model_dir, config, settings.decode_engine.max_model_len)
        self.replica_id = replica_id
        self.backend = ClusterBackend.from_settings(
            settings,
            model=ModelCard(
                id=_model_id(settings),
                max_model_len=facts.max_model_len,
                vocab_size=config.vocab_size,
            ),
            model_config=config,
            tokenizer=Tokenizer.from_dir(model_dir),
            decode=decode,
            metrics=IngressMetrics(replica_id),
        )
        await self.backend.start()
        self._api_key = settings.api_key()
        self._health_timeout_s = settings.health_timeout_s
        self._refusals = settings.refusal_budget()
        grpc = settings.grpc
        self.server = await TandemServer.start(
            self.backend,
            ServerConfig(
                host=grpc.host,
                port=grpc.port,
                api_key=settings.api_key(),
                health_timeout_s=settings.health_timeout_s,
                tls_cert_file=grpc.tls_cert_file,
                tls_key_file=grpc.tls_key_file,
                health_port=grpc.health_port,
                shared_port=grpc.shared_port,
                refusals=self._refusals,
            ),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The HTTP API's app, over the same backend as the gRPC server (Serve calls this
        after __init__)."""
        return build_http_app(
            self.backend,
            HttpConfig(
                api_key=self._api_key,
                health_timeout_s=self._health_timeout_s,
                refusals=self._refusals,
            ),
        )

    def target(self) -> str:
        """host:port of this replica's gRPC server, for clients on this machine."""
        return self.server.target

    async def router_state(self, tandem_replica: str = "") -> str:
        """This replica's placement view (prefix index digest, workers) and decision
        counts, as JSON. Async: it runs on the event loop that updates the index."""
        return json.dumps({"replica_id": self.replica_id, **self.backend.router_state()})

    async def explain_placement(self, prompt_json: str, tandem_replica: str = "") -> str:
        """Where a prompt (a JSON list of token ids) would be placed now, as JSON; the
        request is not run and no policy state moves."""
        placement = self.backend.place(json.loads(prompt_json), dry_run=True)
        return json.dumps({"replica_id": self.replica_id, **dataclasses.asdict(placement)})

    async def __del__(self) -> None:
        await self.server.stop(grace_s=5.0)
        await self.backend.close()


def _bind(
    args_json: str, settings: TandemSettings, options: dict[str, dict[str, Any]]
) -> Application:
    """The three deployments; each gets Serve health checks as `settings.health` says,
    under whatever `options` (the config file's) sets itself."""
    health = settings.health.serve_options()
    # A worker of N expert-parallel ranks asks Ray for a CPU (on CUDA also a GPU) per rank,
    # unless the file names its resources (cluster/config.py checks those).
    workers = {
        PREFILL: worker_actor_options(settings.prefill_ep, settings.prefill_engine),
        DECODE: worker_actor_options(settings.decode_ep, settings.decode_engine),
    }

    def opts(name: str) -> dict[str, Any]:
        return {**health, **workers.get(name, {}), **options.get(name, {})}

    prefill = PrefillServer.options(**opts(PREFILL)).bind(args_json)
    decode = DecodeServer.options(**opts(DECODE)).bind(args_json, prefill)
    return Ingress.options(**opts(INGRESS)).bind(args_json, decode)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder Serve configs name: `args` is the config's `args`. Serve
    applies the config's `deployments` section over what this returns."""
    settings, args_json = parse_args(args)
    return _bind(args_json, settings, {})


def build_application(config: AppConfig) -> Application:
    """The application with the config's deployment options applied (for serve.run)."""
    options = {name: d.options() for name, d in config.deployments.items()}
    return _bind(config.args_json, config.settings, options)
