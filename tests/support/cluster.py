"""A real tandem cluster for the router's integration test and benchmark, and the
multi-turn chat workload both run on it.

    serve_cluster(...)  local Ray, a private redis-server, the Serve app of
                        cluster/app.py (Ingress x N, PrefillServer x K, DecodeServer x M)
    add_ingress_app()   one more Ingress, with placement settings of its own, in an app
                        of its own (own gRPC port) over the same workers: two policies
                        compared on the same replicas without restarting them
    run_chat_workload() many conversations at once, each turn's prompt the previous
                        prompt + the answer the cluster generated + a new user message

Used by tests/test_router_cluster.py and bench/router_ttft.py (which puts tests/ on its
path), so the benchmark measures exactly the workload the test checks.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from tandem.cluster.app import Ingress, build_application
from tandem.cluster.client import TandemClient
from tandem.cluster.config import DECODE, INGRESS, PREFILL, parse_app_config, parse_args
from tandem.cluster.redis_server import LocalRedis
from tandem.workers.control_plane import WorkerRegistry

# The engine of the tiny-model test clusters (each pool), unless a test needs another.
TEST_ENGINE = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 8,
    "kv_cache_tokens": 4096,
    "max_num_seqs": 16,
    "max_num_batched_tokens": 128,
    "max_model_len": 512,
}
# Generous bound for one stream on 2 shared cores; a hang fails instead of blocking.
STREAM_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def app_args(
    model_dir: str,
    redis_url: str,
    port: int,
    *,
    cluster_name: str,
    engine: Mapping[str, Any],
    placement: Mapping[str, Any],
    disagg: Mapping[str, Any] | None = None,
    control_plane: Mapping[str, Any] | None = None,
    model_id: str = "tiny",
    ingress_args: Mapping[str, Any] | None = None,
    more_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The application `args` (cluster/config.py TandemArgs) of a test cluster;
    `more_args`: further top-level sections (e.g. `health`)."""
    return {
        **dict(more_args or {}),
        **({"ingress": dict(ingress_args)} if ingress_args else {}),
        "cluster_name": cluster_name,
        "model": str(model_dir),
        "model_id": model_id,
        "redis_url": redis_url,
        # several Ingress replicas of one test cluster share the port on this one host
        "grpc": {"host": "127.0.0.1", "port": port, "shared_port": True},
        "disagg": dict(disagg or {"local_prefill_threshold": 32, "transfer_deadline_s": 10.0}),
        "placement": dict(placement),
        "engine": {"prefill": dict(engine), "decode": dict(engine)},
        "control_plane": dict(
            control_plane
            or {
                "heartbeat_ttl_s": 3.0,
                "heartbeat_interval_s": 0.25,
                "registry_poll_s": 0.2,
                "metrics_interval_s": 0.25,
            }
        ),
    }


@dataclass
class RunningCluster:
    app: str
    args: dict[str, Any]
    target: str
    registry: WorkerRegistry
    redis_url: str
    extra_apps: list[str] = field(default_factory=list)

    @property
    def cluster_name(self) -> str:
        return self.args["cluster_name"]

    def replicas(self, role: str) -> list[str]:
        return sorted(w.replica_id for w in self.registry.live_workers(role))

    def worker_metrics(self, role: str, replica_id: str) -> dict:
        """The engine figures of one worker replica, through a call pinned to it."""
        name = PREFILL if role == "prefill" else DECODE
        handle = serve.get_deployment_handle(name, app_name=self.app)
        return json.loads(handle.metrics.remote(tandem_replica=replica_id).result())

    def ingress_replicas(self, app: str | None = None) -> list[str]:
        """Ids of the live Ingress replicas of `app` (default: the cluster's own)."""
        prefix = f"SERVE_REPLICA::{app or self.app}#{INGRESS}#"
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        return sorted(n[len(prefix) :] for n in names if n.startswith(prefix))

    def ingress_call(self, replica_id: str, method: str, *args: Any, app: str | None = None):
        """Call an Ingress method on one replica (pinned); its JSON answer, parsed. The
        answer names the replica that ran it, which the caller should check."""
        handle = serve.get_deployment_handle(INGRESS, app_name=app or self.app)
        reply = getattr(handle, method).remote(*args, tandem_replica=replica_id).result()
        return json.loads(reply)

    def router_states(self, app: str | None = None) -> dict[str, dict]:
        """router_state() of every Ingress replica of `app`, by replica id."""
        states = {}
        for rid in self.ingress_replicas(app):
            state = self.ingress_call(rid, "router_state", app=app)
            assert state["replica_id"] == rid, (state["replica_id"], rid)
            states[rid] = state
        return states

    def add_ingress_app(self, name: str, placement: Mapping[str, Any], replicas: int = 1) -> str:
        """Deploy an Ingress with other placement settings over this cluster's workers;
        returns its gRPC target."""
        port = free_port()
        args = json.loads(json.dumps(self.args))
        args["placement"] = dict(placement)
        args["grpc"]["port"] = port
        _, args_json = parse_args(args)
        decode = serve.get_deployment_handle(DECODE, app_name=self.app)
        ingress = Ingress.options(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
        serve.run(ingress.bind(args_json, decode), name=name, route_prefix=None)
        self.extra_apps.append(name)
        return f"127.0.0.1:{port}"


@contextmanager
def serve_cluster(
    model_dir: str,
    *,
    app: str,
    cluster_name: str,
    engine: Mapping[str, Any],
    placement: Mapping[str, Any],
    prefill: int,
    decode: int,
    ingress: int,
    disagg: Mapping[str, Any] | None = None,
    control_plane: Mapping[str, Any] | None = None,
    http_port: int | None = None,
    model_id: str = "tiny",
    autoscaling: Mapping[str, Mapping[str, Any]] | None = None,
    ingress_args: Mapping[str, Any] | None = None,
    deployment_options: Mapping[str, Mapping[str, Any]] | None = None,
    more_args: Mapping[str, Any] | None = None,
) -> Iterator[RunningCluster]:
    """Start Redis, Ray and the app; yields once every worker is in the registry and
    every Ingress replica runs. `autoscaling` maps a deployment name to its Serve
    autoscaling_config (its pool then starts at min_replicas, which the counts given
    must equal; Ray gets CPUs for max_replicas); `deployment_options` adds Serve options
    per deployment name. With `http_port`, Serve's HTTP proxy
    serves the app's OpenAI-compatible API there (on 127.0.0.1, routed at "/")."""
    with LocalRedis() as redis_server:
        port = free_port()
        args = app_args(
            model_dir,
            redis_server.url,
            port,
            cluster_name=cluster_name,
            engine=engine,
            placement=placement,
            disagg=disagg,
            control_plane=control_plane,
            ingress_args=ingress_args,
            model_id=model_id,
            more_args=more_args,
        )

        def deployment(name: str, replicas: int) -> dict[str, Any]:
            count: dict[str, Any] = {"num_replicas": replicas}
            if autoscaling and name in autoscaling:  # replicas then start at min_replicas
                count = {"autoscaling_config": dict(autoscaling[name])}
            return {
                "name": name,
                **count,
                "ray_actor_options": {"num_cpus": 1},
                "graceful_shutdown_timeout_s": 5,
                # A killed replica is noticed (and replaced) within seconds.
                "health_check_period_s": 1.0,
                **(deployment_options or {}).get(name, {}),
            }

        http = http_port is not None
        config = parse_app_config(
            {
                "proxy_location": "EveryNode" if http else "Disabled",
                "http_options": {"host": "127.0.0.1", "port": http_port or 8000},
                "applications": [
                    {
                        "name": app,
                        "import_path": "tandem.cluster.app:build_app",
                        "route_prefix": "/" if http else None,
                        "args": args,
                        "deployments": [
                            deployment("Ingress", ingress),
                            deployment("PrefillServer", prefill),
                            deployment("DecodeServer", decode),
                        ],
                    }
                ],
            }
        )
        # Logical CPUs: room for every replica (one each) and a few extra Ingress apps.
        replicas = prefill + decode + ingress
        for scaled in (autoscaling or {}).values():
            replicas += scaled["max_replicas"] - scaled["min_replicas"]
        ray.init(num_cpus=replicas + 4, include_dashboard=False, log_to_driver=False)
        registry = WorkerRegistry(redis_server.url, cluster=cluster_name)
        try:
            serve.start(
                proxy_location=config.serve.proxy_location,
                http_options=config.serve.http_options.model_dump(exclude_unset=True),
            )
            serve.run(build_application(config), name=app, route_prefix=config.route_prefix)
            cluster = RunningCluster(
                app=app,
                args=args,
                target=f"127.0.0.1:{port}",
                registry=registry,
                redis_url=redis_server.url,
            )
            wait_for(
                lambda: (
                    len(cluster.replicas("prefill")) == prefill
                    and len(cluster.replicas("decode")) == decode
                ),
                60,
                "every worker in the registry",
            )
            wait_for(lambda: len(cluster.ingress_replicas()) == ingress, 60, "ingress replicas")
            yield cluster
        finally:
            registry.close()
            serve.shutdown()
            ray.shutdown()


# ------------------------------------------------------------------ the workload


@dataclass(frozen=True)
class ChatWorkload:
    """Conversations that run at once, turn after turn, like users of a chat service.

    Turn k's prompt is turn k-1's prompt, the answer the cluster generated for it (as
    token ids, the way a server keeps chat history), and a new user message; every
    conversation starts with the same system prompt. Users take a random think time
    between an answer and their next message, and start at random moments.
    """

    vocab_size: int
    seed: int = 0
    conversations: int = 16
    turns: int = 5
    system_tokens: int = 32
    first_user_tokens: tuple[int, int] = (48, 80)
    user_tokens: tuple[int, int] = (24, 56)
    answer_tokens: tuple[int, int] = (24, 40)
    # Inclusive ranges, drawn per turn; answers are exactly this long (ignore_eos).
    think_s: tuple[float, float] = (0.3, 0.8)
    start_within_s: float = 2.0


@dataclass(frozen=True)
class TurnResult:
    conversation: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    # Client side: call start to the first streamed token.
    finished_at: float
    # time.monotonic() when the last chunk arrived.
    prefill_replica: str
    decode_replica: str
    kv_transfer_s: float
    # Server side (the last chunk's timings): moving the prompt's KV (0: prefilled on
    # the decode worker).


def _channel_options() -> list[tuple[str, Any]]:
    # A subchannel pool of its own: each client opens its own TCP connection, so the
    # kernel spreads the clients over the Ingress replicas sharing the port (SO_REUSEPORT).
    return [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class WorkloadRun:
    results: list[TurnResult]
    # In completion order.
    histories: dict[int, list[int]]
    # Conversation -> its last prompt and answer (what a next turn would extend).
    wall_s: float


def run_chat_workload(target: str, workload: ChatWorkload, clients: int = 16) -> WorkloadRun:
    """Run every conversation to its last turn."""
    rng = random.Random(workload.seed)
    system = [rng.randrange(workload.vocab_size) for _ in range(workload.system_tokens)]
    plans = []
    for c in range(workload.conversations):
        crng = random.Random(rng.random())
        plans.append((c, crng, crng.uniform(0, workload.start_within_s)))
    pool = [TandemClient(target, options=_channel_options()) for _ in range(clients)]
    results: list[TurnResult] = []
    histories: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def converse(c: int, crng: random.Random, start_after: float) -> None:
        client = pool[c % clients]
        time.sleep(start_after)
        history = list(system)
        for turn in range(workload.turns):
            span = workload.first_user_tokens if turn == 0 else workload.user_tokens
            history += [crng.randrange(workload.vocab_size) for _ in range(crng.randint(*span))]
            max_tokens = crng.randint(*workload.answer_tokens)
            started = time.monotonic()
            first = None
            answer: list[int] = []
            last = None
            for chunk in client.generate(
                history,
                timeout=STREAM_TIMEOUT_S,
                max_tokens=max_tokens,
                temperature=0.0,
                ignore_eos=True,
            ):
                if chunk.token_ids and first is None:
                    first = time.monotonic()
                answer += chunk.token_ids
                last = chunk
            assert last is not None and first is not None and len(answer) == max_tokens
            with lock:
                results.append(
                    TurnResult(
                        conversation=c,
                        turn=turn,
                        prompt_tokens=last.usage.prompt_tokens,
                        cached_tokens=last.usage.cached_tokens,
                        completion_tokens=last.usage.completion_tokens,
                        ttft_s=first - started,
                        finished_at=time.monotonic(),
                        prefill_replica=last.served_by.prefill_replica,
                        decode_replica=last.served_by.decode_replica,
                        kv_transfer_s=last.timings.kv_transfer_s,
                    )
                )
            history += answer
            if turn + 1 < workload.turns:
                time.sleep(crng.uniform(*workload.think_s))
        histories[c] = history

    def run(plan) -> None:
        try:
            converse(*plan)
        except BaseException as err:  # reported by the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for client in pool:
            client.close()
    if errors:
        raise errors[0]
    return WorkloadRun(results, histories, time.monotonic() - started)


def hit_rate(results: Sequence[TurnResult]) -> float:
    """Cached prompt tokens / prompt tokens, as the serving workers reported them."""
    return sum(r.cached_tokens for r in results) / sum(r.prompt_tokens for r in results)
