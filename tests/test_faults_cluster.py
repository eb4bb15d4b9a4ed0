"""Stopped and killed replicas on a real cluster (RELIABILITY targets 2, 4 and 19): local
Ray, a real redis-server, 2 prefill + 2 decode + 1 ingress replicas of the tiny model on
CPU, gRPC and HTTP over loopback.

- A decode replica stopped with SIGSTOP answers nothing: its health, asked at the
  ingress (grpc.health.v1 `tandem.v1.Replica/<id>`, HTTP `/health?replica=<id>`), is
  never SERVING while it is stopped; the ingress's own health stays SERVING on the other
  replica's word; the registry leaves it out (its heartbeat stands still) so placement
  stops choosing it; Serve replaces it (its health check times out three times).
- Both prefill replicas stopped: the decode replica prefills locally once their
  heartbeats stand still (Ray still reports them alive).
- Both prefill replicas killed: the next long prompt is prefilled on its decode replica
  as soon as the decode replica learns its peer is dead (Ray), not after the transfer
  deadline (an hour here, so waiting for it fails the test), and the dead replica's
  registry record is evicted then (the TTL here is 30 s), so placement stops choosing it.

One cluster for the module; the prefill test runs last (the pool is then rebuilding).
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.health import REPLICA_SERVICE_PREFIX
from tandem.cluster.client import TandemClient
from tandem.cluster.config import DECODE, PREFILL
from tandem.cluster.peer_probe import SERVE_NAMESPACE, replica_actor_name
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tests.support.cluster import (
    STREAM_TIMEOUT_S,
    TEST_ENGINE,
    free_port,
    serve_cluster,
    wait_for,
)

APP = "tandem-faults"
THRESHOLD = 16
# Long enough that a request waiting for it fails the test's stream bound instead.
TRANSFER_DEADLINE_S = 3600.0
HEALTH = {"check_timeout_s": 1.0, "check_period_s": 1.0}
# Serve marks a replica unhealthy after 3 failed checks of (1 + 1) s: the acceptance
# bound of issue #19 for the replacement to be registered.
REPLACED_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, http_port):
    with serve_cluster(
        tiny_model_dir,
        app=APP,
        cluster_name="faults",
        engine=TEST_ENGINE,
        placement={},
        prefill=2,
        decode=2,
        ingress=1,
        disagg={"local_prefill_threshold": THRESHOLD, "transfer_deadline_s": TRANSFER_DEADLINE_S},
        control_plane={
            # A long TTL: a record that leaves sooner was evicted or left out as stale.
            "heartbeat_ttl_s": 30.0,
            "heartbeat_interval_s": 0.25,
            "registry_poll_s": 0.2,
            "metrics_interval_s": 0.25,
        },
        http_port=http_port,
        more_args={"health": HEALTH},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster):
    with TandemClient(cluster.target) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**TEST_ENGINE))


def _replica_health(cluster, replica_id: str) -> int:
    with grpc.insecure_channel(cluster.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=REPLICA_SERVICE_PREFIX + replica_id)
        return stub.Check(request, timeout=30).status


def _http_health(port: int, replica_id: str | None = None) -> tuple[int, str]:
    """The status code and body of GET /health (of one replica with `replica_id`)."""
    query = f"?replica={replica_id}" if replica_id else ""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health{query}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _pid(app: str, deployment: str, replica_id: str) -> int:
    actor = ray.get_actor(replica_actor_name(app, deployment, replica_id), SERVE_NAMESPACE)
    return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def _generate(client: TandemClient, prompt: list[int], max_tokens: int = 4):
    """Token ids, the last chunk, and the seconds to the first token."""
    started = time.monotonic()
    ids, last, ttft = [], None, None
    params = {"temperature": 0.0, "ignore_eos": True, "max_tokens": max_tokens}
    for chunk in client.generate(prompt, timeout=STREAM_TIMEOUT_S, **params):
        if ttft is None and chunk.token_ids:
            ttft = time.monotonic() - started
        ids.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason == pb.FINISH_REASON_LENGTH
    return ids, last, ttft


def _want(reference: LLMEngine, prompt: list[int], max_tokens: int = 4) -> list[int]:
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    return reference.generate([prompt], params)[0].token_ids


def test_healthy_replicas_report_serving(cluster, http_port):
    for rid in cluster.replicas("decode") + cluster.replicas("prefill"):
        assert _replica_health(cluster, rid) == health_pb2.HealthCheckResponse.SERVING, rid
    assert _replica_health(cluster, "no-such-replica") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert _http_health(http_port)[0] == 200, _http_health(http_port)
    assert _http_health(http_port, cluster.replicas("decode")[0])[0] == 200


def test_stopped_decode_replica_is_never_serving_leaves_placement_and_is_replaced(
    cluster, client, reference, http_port
):
    before = cluster.replicas("decode")
    victim, survivor = before
    pid = _pid(APP, DECODE, victim)
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Asked while it is stopped, again and again: never SERVING, over both APIs.
        for _ in range(3):
            assert _replica_health(cluster, victim) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _http_health(http_port, victim)[0] == 503
        # The ingress itself serves on the other replica's word, not the stopped one's.
        assert _replica_health(cluster, survivor) == health_pb2.HealthCheckResponse.SERVING
        assert client.health(timeout=30).status == pb.HealthResponse.SERVING
        # Its heartbeat stands still: the ingress's placement view drops it.
        wait_for(
            lambda: victim not in cluster.router_states()[cluster.ingress_replicas()[0]]["workers"],
            10,
            "the stopped replica left the ingress's placement view",
        )
        prompt = list(range(300, 340))
        ids, last, _ = _generate(client, prompt)
        assert ids == _want(reference, prompt)
        assert last.served_by.decode_replica != victim
        # Serve replaces it: a new decode replica registers while the old is stopped.
        wait_for(
            lambda: len(set(cluster.replicas("decode")) - set(before)) == 1,
            REPLACED_WITHIN_S,
            "Serve's replacement of the stopped replica",
        )
        replaced_s = time.monotonic() - stopped_at
        assert _replica_health(cluster, victim) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # Serve already killed it
    print(f"stopped decode replica replaced after {replaced_s:.1f} s")


def test_stopped_prefill_replicas_are_not_waited_for(cluster, client, reference):
    """Both prefill replicas stopped (SIGSTOP): Ray still calls them alive, so only their
    heartbeats standing still tell; the decode replica gives up on its peer then and
    prefills locally (the transfer deadline is an hour)."""
    victims = cluster.replicas("prefill")
    pids = [_pid(APP, PREFILL, rid) for rid in victims]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        prompt = list(range(200, 320))
        ids, last, ttft = _generate(client, prompt)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert ids == _want(reference, prompt)
    assert last.served_by.prefill_replica == ""
    print(f"TTFT of a long prompt while both prefill replicas are stopped: {ttft:.2f} s")


def test_killed_prefill_replicas_are_not_waited_for_and_leave_placement(cluster, client, reference):
    # The previous test's stopped replicas may have been replaced: two alive again first.
    wait_for(lambda: len(cluster.replicas("prefill")) == 2, 60, "two prefill replicas")
    victims = cluster.replicas("prefill")
    for rid in victims:
        ray.kill(ray.get_actor(replica_actor_name(APP, PREFILL, rid), SERVE_NAMESPACE))
    # Placed at once, before any heartbeat could go stale: the ingress may still choose a
    # dead replica; its decode replica must not wait an hour for it.
    prompt = list(range(100, 220))
    ids, last, ttft = _generate(client, prompt)
    assert ids == _want(reference, prompt)
    assert last.served_by.prefill_replica == ""  # prefilled on the decode replica
    # Within a few heartbeats (the TTL is 30 s): no victim in the ingress's view, and the
    # one the decode replica found dead (if placement chose one) evicted from Redis.
    ingress = cluster.ingress_replicas()[0]
    wait_for(
        lambda: not set(victims) & set(cluster.router_states()[ingress]["workers"]),
        10,
        "the dead prefill replicas left the ingress's placement view",
    )
    wait_for(
        lambda: any(cluster.registry.get(rid) is None for rid in victims),
        10,
        "the dead prefill replica's record evicted",
    )
    second = list(range(600, 720))
    ids, last, _ = _generate(client, second)
    assert ids == _want(reference, second)
    assert last.served_by.prefill_replica not in victims
    print(f"TTFT of the first long prompt after both prefill replicas died: {ttft:.2f} s")
