"""The Ray Serve cluster end to end: a real local Ray, a real redis-server, 2 prefill + 2
decode + 1 ingress replicas of the tiny model on CPU, gRPC over loopback.

One cluster for the whole module (starting Ray and five replicas costs most of the
module's time). The test that kills a prefill replica runs last. References are the
in-process engine (tandem.workers.engine.llm_engine.LLMEngine) on the same checkpoint and
engine settings: every cluster output must equal it token for token.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import openai
import pytest
import ray
import redis
import yaml
from ray import serve

from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.gen import tandem_pb2_grpc
from tandem.cluster.api.server import FIELD_METADATA_KEY
from tandem.cluster.app import build_application
from tandem.cluster.client import TandemClient
from tandem.cluster.config import DECODE, PREFILL, parse_app_config
from tandem.cluster.redis_server import LocalRedis
from tandem.workers.control_plane import KeySpace, WorkerRegistry
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tests.support.cluster import TEST_ENGINE
from tests.support.serve_process import serve_process

APP = "tandem-test"
CLUSTER_NAME = "test"
ENGINE = TEST_ENGINE
THRESHOLD = 16
TRANSFER_DEADLINE_S = 3.0
GREEDY = {"temperature": 0.0, "ignore_eos": True}
# Generous bound for a whole stream on 2 shared cores; a hang fails instead of blocking.
STREAM_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir, redis_url: str | None, port: int) -> dict:
    return {
        "proxy_location": "Disabled",
        "applications": [
            {
                "name": APP,
                "import_path": "tandem.cluster.app:build_app",
                "route_prefix": None,
                "args": {
                    "cluster_name": CLUSTER_NAME,
                    "model": str(model_dir),
                    "model_id": "tiny",
                    "redis_url": redis_url,
                    "grpc": {"host": "127.0.0.1", "port": port},
                    "disagg": {
                        "local_prefill_threshold": THRESHOLD,
                        "transfer_deadline_s": TRANSFER_DEADLINE_S,
                    },
                    "engine": {"prefill": ENGINE, "decode": ENGINE},
                    "control_plane": {
                        "heartbeat_ttl_s": 3.0,
                        "heartbeat_interval_s": 0.25,
                        "registry_poll_s": 0.2,
                        "metrics_interval_s": 0.5,
                    },
                },
                "deployments": [
                    {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
                    {
                        "name": "PrefillServer",
                        "num_replicas": 2,
                        "ray_actor_options": {"num_cpus": 1},
                    },
                    {
                        "name": "DecodeServer",
                        "num_replicas": 2,
                        "ray_actor_options": {"num_cpus": 1},
                        "graceful_shutdown_timeout_s": 5,
                    },
                ],
            }
        ],
    }


@dataclass
class Cluster:
    target: str
    registry: WorkerRegistry
    redis: redis.Redis

    def replicas(self, role: str) -> list[str]:
        return sorted(w.replica_id for w in self.registry.live_workers(role))

    def worker_metrics(self, role: str, replica_id: str) -> dict:
        """The engine figures of one replica, through a call pinned to it."""
        name = PREFILL if role == "prefill" else DECODE
        handle = serve.get_deployment_handle(name, app_name=APP)
        return json.loads(handle.metrics.remote(tandem_replica=replica_id).result())


def _wait(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir) -> Iterator[Cluster]:
    with LocalRedis() as redis_server:
        port = _free_port()
        config = parse_app_config(_config(tiny_model_dir, redis_server.url, port))
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        registry = WorkerRegistry(redis_server.url, cluster=CLUSTER_NAME)
        try:
            serve.start(proxy_location="Disabled")
            serve.run(build_application(config), name=APP, route_prefix=None)
            c = Cluster(
                target=f"127.0.0.1:{port}",
                registry=registry,
                redis=redis.Redis.from_url(redis_server.url, decode_responses=True),
            )
            _wait(
                lambda: len(c.replicas("prefill")) == 2 and len(c.replicas("decode")) == 2,
                30,
                "four workers in the registry",
            )
            yield c
        finally:
            registry.close()
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**ENGINE))


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[TandemClient]:
    with TandemClient(cluster.target) as c:
        yield c


@dataclass
class Result:
    token_ids: list[int]
    last: pb.GenerateChunk


def stream(client: TandemClient, prompt: Sequence[int], **params) -> Result:
    ids: list[int] = []
    last = None
    for chunk in client.generate(list(prompt), timeout=STREAM_TIMEOUT_S, **params):
        ids.extend(chunk.token_ids)
        last = chunk
    assert last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return Result(ids, last)


def expected(reference: LLMEngine, prompts: Sequence[Sequence[int]], max_tokens: int):
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
    return [c.token_ids for c in reference.generate([list(p) for p in prompts], params)]


def random_prompts(seed: int, lengths: Sequence[int], vocab: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def wait_until_idle(cluster: Cluster) -> None:
    """Until every worker's heartbeat, written after now, shows no work, and the ingress
    has re-read the registry: placement then sees equal loads and breaks ties by id."""
    since = time.time()

    def idle() -> bool:
        workers = cluster.registry.live_workers()
        return len(workers) >= 4 and all(
            w.load.updated_at > since
            and w.load.running == w.load.waiting == 0
            and w.load.kv_usage == 0.0
            for w in workers
        )

    _wait(idle, 10, "idle workers")
    time.sleep(0.5)  # more than two registry polls of the ingress


def kv_is_free(cluster: Cluster) -> bool:
    for role in ("prefill", "decode"):
        for rid in cluster.replicas(role):
            m = cluster.worker_metrics(role, rid)
            if m["kv_usage"] != 0.0 or m["running"] != 0.0 or m["waiting"] != 0.0:
                return False
    return True


# ----------------------------------------------------------------------------- tests


def test_tandem_serve_runs_the_cluster_and_shuts_down_cleanly(tmp_path, tiny_model_dir):
    """`tandem serve` with a config file and flags: a private Redis, a local Ray, the app;
    the API key reaches the ingress through the environment; SIGTERM stops everything.
    Runs first, before this module's own cluster starts."""
    port = _free_port()
    raw = _config(tiny_model_dir, None, port)
    app = raw["applications"][0]
    del app["args"]["redis_url"], app["args"]["model"]
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_REDIS_URL"}
    env["TANDEM_API_KEY"] = "test-key-42"
    command = [sys.executable, "-m", "tandem.cluster.cli", "serve", "--config", str(config_path)]
    command += ["--model", str(tiny_model_dir), "--prefill", "1", "--decode", "1"]
    http_port = _free_port()
    command += ["--http-port", str(http_port)]
    with serve_process(command, env) as server:
        server.wait_ready(180)
        lines = server.lines
        assert f"tandem: gRPC on 127.0.0.1:{port}\n" in lines
        base = f"http://127.0.0.1:{http_port}/v1"
        assert f"tandem: HTTP (OpenAI API) on {base}\n" in lines
        # The OpenAI API on the same cluster, with the same key (the official client).
        with openai.OpenAI(base_url=base, api_key="test-key-42", max_retries=0) as http:
            assert [m.id for m in http.models.list()] == ["tiny"]
            done = http.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3)
            assert done.usage.completion_tokens <= 3 and done.choices[0].finish_reason
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as http:
            with pytest.raises(openai.AuthenticationError):
                http.models.list()
        [redis_line] = [ln for ln in lines if ln.startswith("tandem: private redis-server on")]
        redis_port = int(redis_line.rsplit(":", 1)[1].split("/")[0])
        with TandemClient(f"127.0.0.1:{port}") as anonymous:
            assert anonymous.health().status == pb.HealthResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(anonymous.generate([1, 2, 3], max_tokens=2))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TandemClient(f"127.0.0.1:{port}", api_key="test-key-42") as client:
            result = stream(client, list(range(40, 80)), max_tokens=4, **GREEDY)
            assert len(result.token_ids) == 4 and result.last.served_by.prefill_replica
        assert server.stop() == 0, server.tail()
    assert "tandem: shutting down\n" in lines
    for stopped_port in (port, http_port, redis_port):
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", stopped_port))


def test_health_and_models(client):
    assert client.health().status == pb.HealthResponse.SERVING
    [model] = client.list_models()
    assert model.id == "tiny"


def test_calls_are_pinned_to_the_named_replica(cluster):
    """The custom request router sends a call to the replica its pin names, and falls
    back to a live replica when the pin names none that exists."""
    for role in ("prefill", "decode"):
        replicas = cluster.replicas(role)
        assert len(replicas) == 2
        for rid in replicas:
            for _ in range(4):
                assert cluster.worker_metrics(role, rid)["replica_id"] == rid
        assert cluster.worker_metrics(role, "no-such-replica")["replica_id"] in replicas
    # A prefill carries a KV ticket for one replica: landing elsewhere, it is refused
    # before any work (the decode worker then prefills locally).
    prefill = serve.get_deployment_handle(PREFILL, app_name=APP)
    with pytest.raises(ValueError, match="pinned to replica 'no-such-replica'"):
        prefill.prefill.remote("{}", tandem_replica="no-such-replica").result()


def test_workers_publish_kv_block_events(cluster, client, reference):
    """Each worker's stream in Redis records the blocks its prefix cache stored."""
    prompt = random_prompts(9, [64], reference.config.vocab_size)[0]
    result = stream(client, prompt, max_tokens=4, **GREEDY)
    by = result.last.served_by
    keys = KeySpace(CLUSTER_NAME)

    def stored_blocks(replica_id: str) -> int:
        entries = cluster.redis.xrange(keys.kv_stream(replica_id))
        return sum(1 for _, fields in entries if fields["kind"] == "stored")

    # 64 prompt tokens are 8 full blocks of the full-attention group at least.
    _wait(lambda: stored_blocks(by.prefill_replica) >= 8, 5, "the prefill worker's events")
    _wait(lambda: stored_blocks(by.decode_replica) >= 1, 5, "the decode worker's events")


def test_concurrent_streams_match_the_engine_and_move_kv(cluster, client, reference):
    """16 concurrent greedy streams over 2 prefill + 2 decode replicas: outputs equal the
    in-process engine's; every prompt's KV came by transfer; both pools share the work."""
    vocab = reference.config.vocab_size
    lengths = [20 + 7 * i for i in range(16)]
    prompts = random_prompts(1, lengths, vocab)
    want = expected(reference, prompts, max_tokens=12)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: stream(client, p, max_tokens=12, **GREEDY), prompts))
    prefill_ids, decode_ids = set(cluster.replicas("prefill")), set(cluster.replicas("decode"))
    for prompt, result, tokens in zip(prompts, results, want, strict=True):
        assert result.token_ids == tokens
        last = result.last
        assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == 12
        assert last.served_by.prefill_replica in prefill_ids, last.served_by
        assert last.served_by.decode_replica in decode_ids
        assert last.timings.kv_transfer_s > 0
    assert {r.last.served_by.prefill_replica for r in results} == prefill_ids
    assert {r.last.served_by.decode_replica for r in results} == decode_ids
    _wait(lambda: kv_is_free(cluster), 5, "all KV blocks released")


def test_short_prompt_is_prefilled_on_the_decode_worker(cluster, client, reference):
    prompt = random_prompts(2, [THRESHOLD - 1], reference.config.vocab_size)[0]
    result = stream(client, prompt, max_tokens=8, **GREEDY)
    assert result.token_ids == expected(reference, [prompt], 8)[0]
    assert result.last.served_by.prefill_replica == ""
    assert result.last.served_by.decode_replica in cluster.replicas("decode")
    assert result.last.timings.kv_transfer_s == 0.0


def test_shared_prefix_is_cached_on_the_second_request(cluster, client, tiny_model_dir):
    """Two prompts sharing 48 tokens, one after the other on an idle cluster: both go to
    the same replicas, the second's KV still moves by transfer, and its usage reports the
    prefix found in the prefill worker's cache, as the in-process engine does."""
    rng = random.Random(3)
    shared = [rng.randrange(1000) for _ in range(48)]
    first = shared + [rng.randrange(1000) for _ in range(30)]
    second = shared + [rng.randrange(1000) for _ in range(30)]
    engine = LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**ENGINE))
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
    [ref_first] = engine.generate([first], params)
    [ref_second] = engine.generate([second], params)
    assert ref_second.usage.cached_tokens == 48  # the reference itself: 6 full blocks

    wait_until_idle(cluster)
    a = stream(client, first, max_tokens=6, **GREEDY)
    wait_until_idle(cluster)
    b = stream(client, second, max_tokens=6, **GREEDY)
    assert a.token_ids == ref_first.token_ids and b.token_ids == ref_second.token_ids
    assert a.last.usage.cached_tokens == ref_first.usage.cached_tokens
    assert b.last.usage.cached_tokens == ref_second.usage.cached_tokens
    assert b.last.served_by == a.last.served_by
    assert b.last.served_by.prefill_replica != "" and b.last.timings.kv_transfer_s > 0


@pytest.mark.parametrize("case", ["temperature", "max_tokens", "prompt_ids", "prompt_len"])
def test_bad_requests_are_invalid_argument_naming_the_field(client, reference, case):
    cases = {
        "temperature": ([1, 2, 3], {"temperature": -1.0, "max_tokens": 4}, "temperature"),
        "max_tokens": ([1, 2, 3], {"max_tokens": 600}, "max_tokens"),
        "prompt_ids": ([1, 10**6, 3], {"max_tokens": 4}, "prompt"),
        "prompt_len": (list(range(520)), {"max_tokens": 4}, "prompt"),
    }
    prompt, params, field = cases[case]
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(prompt, timeout=30, **params))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert (FIELD_METADATA_KEY, field) in tuple(err.value.trailing_metadata())
    # The cluster serves on.
    prompt = random_prompts(4, [40], reference.config.vocab_size)[0]
    assert (
        stream(client, prompt, max_tokens=4, **GREEDY).token_ids
        == expected(reference, [prompt], 4)[0]
    )


def test_duplicate_running_request_id_is_refused(client, reference):
    prompt = random_prompts(5, [30], reference.config.vocab_size)[0]
    first = client.generate(
        prompt, request_id="dup-1", timeout=STREAM_TIMEOUT_S, max_tokens=300, **GREEDY
    )
    next(first)  # running now
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(prompt, request_id="dup-1", timeout=30, max_tokens=4))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in err.value.details()
    first.close()


@pytest.mark.parametrize("cancel_after", [0.0, 0.03, 0.1, 0.3, "first-token", "tokens"])
def test_cancelled_requests_free_kv_on_both_workers(cluster, reference, cancel_after):
    """A client cancel at any point (before the prefill is scheduled, during the prefill
    and its transfer, or while decoding) frees the request's KV blocks on the prefill and
    the decode worker within a second."""
    # 300 prompt tokens take the prefill worker 3 steps; 200 more would keep the decode
    # worker busy for seconds.
    prompt = random_prompts(6, [300], reference.config.vocab_size)[0]
    request = pb.GenerateRequest(params=pb.SamplingParameters(temperature=0.0, max_tokens=200))
    request.token_ids.ids.extend(prompt)
    with grpc.insecure_channel(cluster.target) as channel:
        call = tandem_pb2_grpc.TandemStub(channel).Generate(request, timeout=STREAM_TIMEOUT_S)
        if isinstance(cancel_after, float):
            time.sleep(cancel_after)
        else:
            chunks = iter(call)
            next(chunks)
            if cancel_after == "tokens":
                next(chunks)
                next(chunks)
        call.cancel()
        _wait(lambda: kv_is_free(cluster), 1.0, "KV blocks freed on every worker", 0.02)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_ends_the_request_on_every_worker(cluster, reference):
    """A per-request gRPC deadline is honoured end to end: the client gets
    DEADLINE_EXCEEDED when it passes and the work stops on both workers (their KV blocks
    are freed within a second), RELIABILITY target 8."""
    prompt = random_prompts(9, [300], reference.config.vocab_size)[0]
    request = pb.GenerateRequest(params=pb.SamplingParameters(temperature=0.0, max_tokens=200))
    request.token_ids.ids.extend(prompt)
    with grpc.insecure_channel(cluster.target) as channel:
        call = tandem_pb2_grpc.TandemStub(channel).Generate(request, timeout=1.0)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: kv_is_free(cluster), 1.0, "KV blocks freed on every worker", 0.02)


def test_killed_prefill_replica_requests_still_complete(cluster, client, reference):
    """ray.kill a prefill replica while requests are in flight, and send more before the
    registry or Serve notice: every request completes with the engine's output, the late
    ones prefilled by their decode worker (RELIABILITY target 2). Runs last: the cluster
    has one prefill replica less until Serve replaces it."""
    vocab = reference.config.vocab_size
    victim = cluster.replicas("prefill")[0]
    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{PREFILL}#{victim}", namespace="serve")
    early = random_prompts(7, [60 + 5 * i for i in range(8)], vocab)
    late = random_prompts(8, [50 + 5 * i for i in range(4)], vocab)
    want = expected(reference, early + late, 10)
    results: dict[int, Result] = {}

    def run(i: int, prompt: list[int]) -> None:
        results[i] = stream(client, prompt, max_tokens=10, **GREEDY)

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(early)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    ray.kill(actor, no_restart=True)
    late_threads = [
        threading.Thread(target=run, args=(len(early) + i, p)) for i, p in enumerate(late)
    ]
    for t in late_threads:
        t.start()
    for t in threads + late_threads:
        t.join(STREAM_TIMEOUT_S + 10)
    assert sorted(results) == list(range(len(early) + len(late)))
    for i, tokens in enumerate(want):
        assert results[i].token_ids == tokens, i
    for i in range(len(early), len(early) + len(late)):
        assert results[i].last.served_by.prefill_replica != victim
    _wait(lambda: victim not in cluster.replicas("prefill"), 10, "the victim's record expired")
    for rid in cluster.replicas("decode"):
        assert cluster.worker_metrics("decode", rid)["kv_usage"] == 0.0
