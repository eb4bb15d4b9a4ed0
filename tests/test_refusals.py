"""The refusal budget per connection (cluster/api/refusals.py): its token bucket on a
fake clock, then on real gRPC and HTTP servers over loopback (the tiny model's
in-process backend): a connection that used its refusals is answered
RESOURCE_EXHAUSTED / 429 unparsed, another connection is served as before."""

from __future__ import annotations

import asyncio
import http.client
import json

import grpc
import pytest

from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.refusals import RefusalBudget, RefusalBudgetConfig, Throttled
from tandem.cluster.client import TandemClient
from tandem.cluster.http.app import HttpConfig
from tests.support.api_server import EventLoopThread, HttpServer, new_backend

GENERATE = "/tandem.v1.Tandem/Generate"
BUDGET = RefusalBudgetConfig(burst=3, per_s=0.01, tarpit_s=0.0)
# Three refusals, then ~100 s to earn one back: nothing refills during a test.


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_throttles_until_it_refills():
    clock = Clock()
    budget = RefusalBudget(RefusalBudgetConfig(burst=2, per_s=4.0, tarpit_s=0.0), clock)
    assert budget.retry_after("a") == 0.0
    budget.charge("a")
    assert budget.retry_after("a") == 0.0
    budget.charge("a")
    assert budget.retry_after("a") == pytest.approx(0.25)
    assert budget.retry_after("b") == 0.0  # another client is not touched
    with pytest.raises(Throttled) as err:
        asyncio.run(budget.admit("a"))
    assert err.value.retry_after_s == pytest.approx(0.25) and budget.throttled == 1
    clock.now += 0.25
    assert budget.retry_after("a") == 0.0
    asyncio.run(budget.admit("a"))
    # Debt is bounded: a client refused far beyond its burst owes at most one burst.
    for _ in range(100):
        budget.charge("a")
    assert budget.retry_after("a") == pytest.approx((1 + 2) / 4.0)


def test_the_table_of_clients_is_bounded_least_recently_charged_first():
    clock = Clock()
    budget = RefusalBudget(RefusalBudgetConfig(burst=1, per_s=1.0, max_clients=2), clock)
    for client in ("a", "b", "c"):
        budget.charge(client)
    assert budget.retry_after("a") == 0.0  # forgotten
    assert budget.retry_after("b") > 0 and budget.retry_after("c") > 0


def test_a_throttled_call_is_held_in_the_tarpit_then_refused():
    budget = RefusalBudget(RefusalBudgetConfig(burst=1, per_s=0.001, tarpit_s=0.05))
    budget.charge("a")

    async def held() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Throttled):
            await budget.admit("a")
        return loop.time() - started

    assert asyncio.run(held()) >= 0.05


@pytest.mark.parametrize(
    "bad",
    [
        {"burst": 0},
        {"per_s": 0.0},
        {"per_s": float("inf")},
        {"tarpit_s": -1.0},
        {"max_clients": 0},
        {"max_held": True},
    ],
)
def test_bad_budget_configs_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RefusalBudgetConfig(**bad)


# ---------------------------------------------------------------- real servers


@pytest.fixture(scope="module")
def loop_thread():
    lt = EventLoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def backend(loop_thread, tiny_model_dir):
    backend, _, _ = new_backend(tiny_model_dir, model_id="tiny")
    yield backend
    loop_thread.run(backend.close())


def _channel(target: str) -> grpc.Channel:
    # Its own connection: grpc otherwise shares one between channels to a target.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def test_grpc_connection_over_its_budget_is_refused_unparsed(loop_thread, backend):
    server = loop_thread.start_server(backend, refusals=BUDGET)
    try:
        with _channel(server.target) as flooder, _channel(server.target) as other:
            raw = flooder.unary_stream(GENERATE)
            for _ in range(BUDGET.burst):
                with pytest.raises(grpc.RpcError) as err:
                    list(raw(b"\xff\xff\xff", timeout=30))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The same garbage is now refused before it is parsed, and so is a valid
            # request on that connection.
            with pytest.raises(grpc.RpcError) as err:
                list(raw(b"\xff\xff\xff", timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(err.value.trailing_metadata())["retry-after"]
            valid = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))
            valid.params.max_tokens = 2
            with pytest.raises(grpc.RpcError) as err:
                list(raw(valid.SerializeToString(), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # Another connection is served.
            chunks = list(other.unary_stream(GENERATE)(valid.SerializeToString(), timeout=30))
            assert pb.GenerateChunk.FromString(chunks[-1]).finish_reason
        # Valid requests cost nothing: many on one connection are never throttled.
        with TandemClient(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
            for _ in range(2 * BUDGET.burst):
                assert list(c.generate([1, 2, 3], max_tokens=1, timeout=30))
    finally:
        loop_thread.run(server.stop(0))


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def test_http_connection_over_its_budget_gets_429(loop_thread, backend):
    server = HttpServer(loop_thread, backend, HttpConfig(refusals=BUDGET))
    host_port = server.base.removeprefix("http://").removesuffix("/v1")
    host, port = host_port.split(":")
    flooder = http.client.HTTPConnection(host, int(port), timeout=30)
    other = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        for _ in range(BUDGET.burst):
            assert _post(flooder, b"{not json") == 400
        assert _post(flooder, b"{not json") == 429
        good = json.dumps({"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1}).encode()
        assert _post(flooder, good) == 429
        assert _post(other, good) == 200
        # A body declared over the bound is refused on its header, unread.
        other.putrequest("POST", "/v1/completions")
        other.putheader("content-length", str(64 * 1024 * 1024))
        other.putheader("content-type", "application/json")
        other.endheaders()
        response = other.getresponse()
        assert response.status == 413
    finally:
        flooder.close()
        other.close()
        server.stop()
