"""Dead, stopped and leaving prefill peers (RELIABILITY targets 2 and 19), without Ray:
PeerWatch's contract, the decode worker prefilling locally as soon as its peer is known
gone (never waiting out the transfer deadline), and the registry's reader-side
staleness and eviction against a real redis-server. The same faults on a real Ray
cluster are in tests/test_faults_cluster.py."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from tandem.workers.control_plane import WorkerCapacity, WorkerInfo, WorkerRegistry
from tandem.workers.disagg.peers import PeerGone, PeerWatch
from tandem.workers.disagg.roles import DecodeWorker, DisaggConfig, GenerateMessage, decode_delta
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tests.support.cluster import wait_for

CONFIG = EngineConfig(device="cpu", block_size=8, kv_cache_tokens=4096, max_num_batched_tokens=128)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# A deadline no test may wait out: a request that waits for it fails the test's bound.
NEVER_S = 3600.0
BOUND_S = 60.0


class Probe:
    """A probe whose verdict the test sets; records what it was asked."""

    def __init__(self) -> None:
        self.gone: frozenset[str] = frozenset()
        self.asked: list[frozenset[str]] = []

    def __call__(self, peers: frozenset[str]) -> frozenset[str]:
        self.asked.append(peers)
        return self.gone & peers


def test_race_returns_the_calls_result_and_probes_only_awaited_peers():
    probe = Probe()

    async def go():
        watch = PeerWatch(probe, interval_s=0.01)
        watch.start()
        release = asyncio.Event()

        async def call():
            await release.wait()
            return "reply"

        racing = asyncio.ensure_future(watch.race(call(), "p1"))
        await asyncio.wait_for(_until(lambda: probe.asked), BOUND_S)
        release.set()
        result = await asyncio.wait_for(racing, BOUND_S)
        await watch.close()
        return result

    assert asyncio.run(go()) == "reply"
    assert probe.asked and all(asked == {"p1"} for asked in probe.asked)


def test_race_raises_peer_gone_when_the_probe_finds_the_peer_gone_and_cancels_the_call():
    probe = Probe()
    cancelled = []

    async def go():
        watch = PeerWatch(probe, interval_s=0.01)
        watch.start()

        async def hangs():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        racing = asyncio.ensure_future(watch.race(hangs(), "p1"))
        await asyncio.wait_for(_until(lambda: probe.asked), BOUND_S)
        probe.gone = frozenset({"p1"})
        with pytest.raises(PeerGone) as err:
            await asyncio.wait_for(racing, BOUND_S)
        assert err.value.peer == "p1" and watch.is_gone("p1")
        # A gone peer keeps being probed; when its heartbeat moves again it is back.
        probe.gone = frozenset()
        await asyncio.wait_for(_until(lambda: not watch.is_gone("p1")), BOUND_S)
        await asyncio.sleep(0)
        await watch.close()

    asyncio.run(go())
    assert cancelled == [True]


def test_mark_gone_expires_on_its_own_clock():
    now = [100.0]
    watch = PeerWatch(Probe(), interval_s=1.0, clock=lambda: now[0])
    watch.mark_gone("p1", 5.0)
    watch.mark_gone("p2")
    assert watch.is_gone("p1") and watch.is_gone("p2")
    now[0] = 105.0
    assert not watch.is_gone("p1") and watch.is_gone("p2")
    with pytest.raises(ValueError, match="interval_s"):
        PeerWatch(Probe(), interval_s=0)
    assert math.isinf(watch._gone_until["p2"])


# ---------------------------------------------------------------- the decode worker


@pytest.fixture(scope="module")
def decode(tiny_model_dir):
    worker = DecodeWorker.create(
        tiny_model_dir,
        CONFIG,
        "decode-0",
        "127.0.0.1",
        DisaggConfig(local_prefill_threshold=16, transfer_deadline_s=NEVER_S),
    )
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return LLMEngine.from_model_dir(tiny_model_dir, CONFIG)


def _generate(decode: DecodeWorker, prompt, prefill, replica: str, rid: str, probe: Probe, gone=()):
    """Run one request on `decode` with a PeerWatch over `probe`; `gone`: peers marked
    gone before it starts."""

    async def go():
        decode.peers = PeerWatch(probe, interval_s=0.01)
        for peer in gone:
            decode.peers.mark_gone(peer)
        decode.peers.start()
        try:
            ids, served = [], None
            message = GenerateMessage(rid, tuple(prompt), GREEDY).to_json()
            async for text in decode.generate(message, prefill, replica):
                out, info = decode_delta(text)
                ids.extend(out.token_ids)
                served = info or served
            return ids, served
        finally:
            await decode.peers.close()
            decode.peers = None

    return asyncio.run(asyncio.wait_for(go(), BOUND_S))


def test_a_peer_found_gone_mid_call_is_not_waited_for(decode, reference):
    """The prefill call never answers (a killed or stopped replica) and the deadline is an
    hour: the probe's verdict alone ends the wait, and the output is the engine's."""
    prompt = [random.Random(3).randrange(reference.config.vocab_size) for _ in range(60)]
    [want] = reference.generate([prompt], GREEDY)
    probe = Probe()
    calls = []

    async def hangs(request_json: str) -> str:
        calls.append(request_json)
        probe.gone = frozenset({"prefill-dead"})  # the peer dies under the call
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    ids, served = _generate(decode, prompt, hangs, "prefill-dead", "mid-call", probe)
    assert ids == want.token_ids
    assert served.prefill_mode == "fallback" and served.prefill_replica == ""
    assert len(calls) == 1
    assert decode.metrics()["kv_usage"] == 0.0


def test_a_peer_known_gone_is_not_called_at_all(decode, reference):
    prompt = [random.Random(4).randrange(reference.config.vocab_size) for _ in range(60)]
    [want] = reference.generate([prompt], GREEDY)
    probe = Probe()
    calls = []

    async def counting(request_json: str) -> str:
        calls.append(request_json)
        raise AssertionError("a gone peer must not be called")

    ids, served = _generate(
        decode, prompt, counting, "prefill-gone", "known", probe, gone=["prefill-gone"]
    )
    assert ids == want.token_ids and served.prefill_mode == "fallback" and not calls


# ---------------------------------------------------------------- the registry


def _worker(replica_id: str) -> WorkerInfo:
    return WorkerInfo(
        replica_id=replica_id,
        role="prefill",
        model="tiny",
        capacity=WorkerCapacity(max_num_seqs=8, kv_blocks=(64,), block_size=8),
    )


def test_a_stopped_heartbeat_leaves_the_readers_view_before_its_ttl(redis_url):
    """A worker whose heartbeat stands still (a stopped process) is left out by a reader
    with stale_after_s, though its record has not expired; it is back when its heartbeat
    moves again. A reader without stale_after_s still sees it (only expiry removes)."""
    worker = WorkerRegistry(redis_url, ttl_s=60.0, cluster="stale")
    reader = WorkerRegistry(redis_url, ttl_s=60.0, cluster="stale", stale_after_s=0.5)
    plain = WorkerRegistry(redis_url, ttl_s=60.0, cluster="stale")
    try:
        worker.register(_worker("p1"))
        worker.start_heartbeats(0.05)
        wait_for(lambda: [w.replica_id for w in reader.live_workers()] == ["p1"], BOUND_S, "p1")
        worker.stop_heartbeats()  # as SIGSTOP stops the heartbeat thread
        wait_for(lambda: reader.live_workers() == [], BOUND_S, "p1 left out as stale")
        assert reader.get("p1") is not None
        assert [w.replica_id for w in plain.live_workers()] == ["p1"]
        worker.heartbeat()
        assert [w.replica_id for w in reader.live_workers()] == ["p1"]
    finally:
        for r in (worker, reader, plain):
            r.close()


def test_readers_alive_filter_sees_the_fresh_workers_and_has_the_last_word(redis_url):
    seen = []

    def alive(workers: list[WorkerInfo]) -> list[WorkerInfo]:
        seen.append([w.replica_id for w in workers])
        return [w for w in workers if w.replica_id != "dead"]

    workers = [WorkerRegistry(redis_url, ttl_s=60.0, cluster="alive") for _ in range(2)]
    reader = WorkerRegistry(redis_url, ttl_s=60.0, cluster="alive", alive=alive)
    try:
        for registry, rid in zip(workers, ("dead", "p1"), strict=True):
            registry.register(_worker(rid))
        assert [w.replica_id for w in reader.live_workers()] == ["p1"]
        assert seen == [["dead", "p1"]]
        assert reader.get("dead") is not None  # a filter, not an eviction
    finally:
        for r in (*workers, reader):
            r.close()


def test_evict_removes_only_the_named_incarnation(redis_url):
    worker = WorkerRegistry(redis_url, ttl_s=60.0, cluster="evict")
    reader = WorkerRegistry(redis_url, ttl_s=60.0, cluster="evict")
    try:
        info = _worker("p1")
        worker.register(info)
        assert not reader.evict("p1", "another-incarnation")
        assert reader.get("p1") == worker.info
        assert reader.evict("p1", info.incarnation)
        assert reader.get("p1") is None and reader.live_workers() == []
        assert not reader.evict("p1", info.incarnation)
    finally:
        worker.close()
        reader.close()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)
