"""The Redis control plane against a real redis-server: registry, KV event streams, faults."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis

from tandem.cluster.redis_server import LocalRedis
from tandem.workers.control_plane import (
    ControlPlaneUnavailable,
    KeySpace,
    KVEvent,
    KVEventEntry,
    KVEventPublisher,
    KVEventReader,
    WorkerCapacity,
    WorkerInfo,
    WorkerLoad,
    WorkerRegistry,
    decode_event,
    encode_event,
    redact_url,
)

# The real-redis fixtures (redis_url, private_redis) come from tests/redis_fixture.py.

# RELIABILITY target 13: after Redis restarts, the control plane works again within 5 s.
RECOVERY_S = 5.0


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes (a deadline, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def h(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()[:16]


def chain(prefix: str, n: int, group: str = "full") -> list[KVEvent]:
    """n stored events forming one hash chain."""
    events, parent = [], None
    for i in range(n):
        block = h(f"{prefix}{i}")
        events.append(KVEvent.stored(group, block, parent, 8))
        parent = block
    return events


def worker(replica_id: str, role: str = "decode", **kwargs) -> WorkerInfo:
    kwargs.setdefault("transfer_endpoint", "127.0.0.1:29500")
    return WorkerInfo(
        replica_id=replica_id,
        role=role,
        model="tiny-gpt-oss",
        capacity=WorkerCapacity(max_num_seqs=8, kv_blocks=(64, 32), block_size=8),
        **kwargs,
    )


def read_all(reader: KVEventReader, since: dict[str, str] | None = None) -> list[KVEventEntry]:
    """Read until a call returns nothing (`since` applies to the first call only)."""
    out = reader.read(since)
    while batch := reader.read():
        out += batch
    return out


def events_of(entries: list[KVEventEntry], replica_id: str) -> list[KVEvent]:
    return [e.event for e in entries if e.replica_id == replica_id]


RESET = KVEvent.reset()


# -- pure pieces ------------------------------------------------------------------------------


def test_redact_url_hides_passwords_only():
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://user:p%40ss@h:1/2") == "rediss://user:***@h:1/2"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert redact_url("redis://user@host:6379") == "redis://user@host:6379"
    assert redact_url("redis://h:1/0?password=x&db=1") == "redis://h:1/0?password=***&db=1"


def test_bad_urls_are_refused_without_showing_the_password():
    with pytest.raises(ValueError, match="protocol") as info:
        WorkerRegistry("redis://:s3cret@h:1/0?protocol=3")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="redis_url") as info:
        KVEventReader("http://:s3cret@h:1/0")
    assert "s3cret" not in str(info.value)


def test_worker_info_json_round_trip_and_validation():
    load = WorkerLoad(running=3, waiting=1, queued_prompt_tokens=90, kv_usage=0.5)
    info = worker("w1", load=load)
    assert WorkerInfo.from_json(info.to_json()) == info
    with pytest.raises(ValueError, match="role"):
        worker("w1", role="prefil")
    with pytest.raises(ValueError, match="transfer_endpoint"):
        WorkerInfo("w1", "decode", "m", info.capacity, transfer_endpoint="nohost")
    with pytest.raises(ValueError, match="kv_usage"):
        WorkerLoad(kv_usage=1.5)
    with pytest.raises(ValueError, match="capacity.block_size"):
        WorkerCapacity(max_num_seqs=1, kv_blocks=(1,), block_size=0)
    with pytest.raises(ValueError, match="malformed worker record"):
        WorkerInfo.from_json('{"replica_id": "w1"}')


def test_event_encoding_round_trip_and_validation():
    stored = KVEvent.stored("sliding", h("a"), h("p"), 8)
    first = KVEvent.stored("full", h("b"), None, 8)
    removed = KVEvent.removed("full", h("b"))
    for seq, event in enumerate([RESET, stored, first, removed]):
        fields = encode_event(event, "inc1", seq)
        assert decode_event(fields) == (event, "inc1", seq)
    assert encode_event(stored, "inc1", 4) == {
        "kind": "stored",
        "group": "sliding",
        "block_hash": h("a").hex(),
        "parent_hash": h("p").hex(),
        "num_tokens": "8",
        "incarnation": "inc1",
        "seq": "4",
    }
    with pytest.raises(ValueError, match="kind"):
        KVEvent("evicted", "full", h("a"))
    with pytest.raises(ValueError, match="block_hash"):
        KVEvent.stored("full", b"", None, 8)
    with pytest.raises(ValueError, match="num_tokens"):
        KVEvent.stored("full", h("a"), None, 0)
    with pytest.raises(ValueError, match="malformed"):
        decode_event({"kind": "stored"})


# -- registry ---------------------------------------------------------------------------------


def test_register_get_live_workers_by_role(redis_url):
    registries = {r: WorkerRegistry(redis_url, ttl_s=30) for r in ("p1", "d1", "b1")}
    infos = {
        "p1": worker("p1", "prefill"),
        "d1": worker("d1", "decode"),
        "b1": worker("b1", "both", transfer_endpoint=""),
    }
    for replica_id, registry in registries.items():
        assert registry.register(infos[replica_id]) is True
    reader = WorkerRegistry(redis_url)
    try:
        assert [w.replica_id for w in reader.live_workers()] == ["b1", "d1", "p1"]
        assert [w.replica_id for w in reader.live_workers("prefill")] == ["b1", "p1"]
        assert [w.replica_id for w in reader.live_workers("decode")] == ["b1", "d1"]
        assert [w.replica_id for w in reader.live_workers("both")] == ["b1"]
        got = reader.get("d1")
        assert got is not None
        assert (got.role, got.incarnation, got.capacity) == (
            "decode",
            infos["d1"].incarnation,
            infos["d1"].capacity,
        )
        assert reader.get("nobody") is None
        with pytest.raises(ValueError, match="role"):
            reader.live_workers("router")

        assert registries["d1"].deregister() is True
        assert reader.get("d1") is None
        assert [w.replica_id for w in reader.live_workers()] == ["b1", "p1"]
    finally:
        for registry in [*registries.values(), reader]:
            registry.close()


def test_heartbeat_carries_the_load(redis_url):
    with WorkerRegistry(redis_url, ttl_s=30) as registry, WorkerRegistry(redis_url) as reader:
        with pytest.raises(RuntimeError, match="register"):
            registry.heartbeat()
        registry.register(worker("d1"))
        load = WorkerLoad(running=5, waiting=2, queued_prompt_tokens=700, kv_usage=0.25)
        assert registry.heartbeat(load) is True
        got = reader.get("d1")
        assert got is not None
        assert (got.load.running, got.load.waiting, got.load.queued_prompt_tokens) == (5, 2, 700)
        assert got.load.kv_usage == 0.25 and got.load.updated_at > 0


def test_record_expires_without_heartbeats_and_heartbeats_keep_it(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = KeySpace("default")
    with (
        WorkerRegistry(redis_url, ttl_s=1) as silent,
        WorkerRegistry(redis_url, ttl_s=1) as beating,
        WorkerRegistry(redis_url) as reader,
    ):
        silent.register(worker("silent"))
        beating.register(worker("beating"))
        beating.start_heartbeats(interval_s=0.2)
        assert 0 < client.pttl(keys.worker("silent")) <= 1000
        assert wait_for(lambda: reader.get("silent") is None, timeout_s=5)
        assert [w.replica_id for w in reader.live_workers()] == ["beating"]
        # The expired id was pruned from the index; the live one stays.
        assert client.smembers(keys.workers) == {"beating"}
        time.sleep(1.5)  # longer than the TTL: only heartbeats can keep the record
        assert [w.replica_id for w in reader.live_workers()] == ["beating"]
        assert beating.heartbeats_written >= 3
    client.close()


def test_cluster_prefix_separates_clusters(redis_url):
    with (
        WorkerRegistry(redis_url, cluster="blue") as blue,
        WorkerRegistry(redis_url, cluster="green") as green,
    ):
        blue.register(worker("w1"))
        assert [w.replica_id for w in blue.live_workers()] == ["w1"]
        assert green.live_workers() == []
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.exists("tandem:blue:worker:w1") == 1
    with pytest.raises(ValueError, match="cluster"):
        WorkerRegistry(redis_url, cluster="a b")


# -- KV events --------------------------------------------------------------------------------


def test_events_read_back_exactly_in_order_per_worker(redis_url):
    registries = [WorkerRegistry(redis_url, ttl_s=30) for _ in range(2)]
    registries[0].register(worker("a"))
    registries[1].register(worker("b"))
    events_a = [*chain("a", 5), KVEvent.removed("full", h("a1")), *chain("s", 2, "sliding")]
    events_b = chain("b", 3)
    pub_a = KVEventPublisher(redis_url, "a", incarnation=registries[0].info.incarnation)
    pub_b = KVEventPublisher(redis_url, "b", incarnation=registries[1].info.incarnation)
    reader = KVEventReader(redis_url)
    try:
        pub_a.publish(events_a[:4])
        pub_b.publish(events_b)
        pub_a.publish(events_a[4:])
        assert pub_a.flush() and pub_b.flush()

        entries = read_all(reader)
        assert events_of(entries, "a") == [RESET, *events_a]
        assert events_of(entries, "b") == [RESET, *events_b]
        ids_a = [e.stream_id for e in entries if e.replica_id == "a"]
        assert ids_a == sorted(ids_a, key=lambda i: tuple(map(int, i.split("-"))))
        assert reader.read() == []

        more = chain("a-more", 2)
        pub_a.publish(more)
        assert pub_a.flush()
        assert events_of(reader.read(block_ms=1000), "a") == more

        # A reader started later (e.g. a restarted router) catches up from "0".
        with KVEventReader(redis_url) as late:
            entries = read_all(late)
            assert events_of(entries, "a") == [RESET, *events_a, *more]
            assert events_of(entries, "b") == [RESET, *events_b]
        # And a caller can ask for a replay of one stream.
        replay = read_all(reader, since={pub_b.stream: "0"})
        assert [(e.replica_id, e.event) for e in replay] == [("b", RESET)] + [
            ("b", e) for e in events_b
        ]
    finally:
        for closable in (pub_a, pub_b, reader, *registries):
            closable.close()


def test_blocking_read_returns_when_an_event_arrives(redis_url):
    registry = WorkerRegistry(redis_url, ttl_s=30)
    registry.register(worker("w"))
    with KVEventPublisher(redis_url, "w") as publisher, KVEventReader(redis_url) as reader:
        assert publisher.flush()
        assert events_of(read_all(reader), "w") == [RESET]
        late = chain("late", 2)
        timer = threading.Timer(0.3, publisher.publish, args=(late,))
        timer.start()
        got = reader.read(block_ms=5000)
        got += reader.read(block_ms=5000) if len(got) < 2 else []
        timer.join()
        assert events_of(got, "w") == late
    registry.close()


def test_reader_ignores_workers_not_in_registry_and_resets_those_that_leave(redis_url):
    registry = WorkerRegistry(redis_url, ttl_s=30)
    with KVEventPublisher(redis_url, "w") as publisher, KVEventReader(redis_url) as reader:
        publisher.publish(chain("w", 2))
        assert publisher.flush()
        assert reader.read() == []  # not registered yet: its stream is not discovered
        registry.register(worker("w", incarnation=publisher.incarnation))
        assert events_of(reader.read(), "w") == [RESET, *chain("w", 2)]
        registry.deregister()
        assert reader.read() == [KVEventEntry("w", "", RESET)]
        assert reader.read() == []
    registry.close()


def test_stream_is_trimmed_and_a_reader_left_behind_resets(redis_url):
    registry = WorkerRegistry(redis_url, ttl_s=30)
    registry.register(worker("w"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    events = chain("w", 600)
    with (
        KVEventPublisher(redis_url, "w", maxlen=50) as publisher,
        KVEventReader(redis_url) as reader,
    ):
        publisher.publish(events[:1])
        assert publisher.flush()
        assert events_of(reader.read(), "w") == [RESET, events[0]]
        publisher.publish(events[1:])
        assert publisher.flush()
        # Approximate trimming removes whole stream nodes (100 entries by default).
        length = client.xlen(publisher.stream)
        assert 50 <= length <= 50 + 100
        got = events_of(read_all(reader), "w")
        # Entries were trimmed before the reader saw them: reset, then the survivors.
        assert got[0] == RESET
        assert got[1:] == events[-length:]
    client.close()
    registry.close()


def test_reader_rules_for_gaps_duplicates_incarnations_and_garbage(redis_url):
    """Entries written by hand (injected faults) exercise each rule of the reader."""
    registry = WorkerRegistry(redis_url, ttl_s=30)
    registry.register(worker("w"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = KeySpace("default").kv_stream("w")
    e = chain("w", 6)

    def add(event: KVEvent, incarnation: str, seq: int) -> str:
        return client.xadd(stream, encode_event(event, incarnation, seq))

    with KVEventReader(redis_url) as reader:
        add(RESET, "A", 0)
        add(e[0], "A", 1)
        add(e[1], "A", 2)
        add(e[1], "A", 2)  # duplicate of a retried pipeline
        add(e[2], "A", 5)  # seq 3 and 4 were dropped
        client.xadd(stream, {"kind": "stored", "seq": "6"})  # malformed
        add(e[3], "A", 7)
        add(e[4], "B", 3)  # a new incarnation whose reset was trimmed away
        add(RESET, "B", 4)
        add(e[5], "B", 5)
        expected = [
            [RESET, e[0], e[1]],
            [RESET, e[2]],  # gap: seq 3 and 4
            [RESET, e[3]],  # gap: seq 6, the malformed entry
            [RESET, e[4]],  # incarnation A -> B
            [RESET, e[5]],  # B's own reset
        ]
        assert events_of(read_all(reader), "w") == [event for part in expected for event in part]
        assert reader.malformed == 1
    client.close()
    registry.close()


def test_new_incarnation_starts_with_a_reset_and_drops_the_old_history(redis_url):
    registry = WorkerRegistry(redis_url, ttl_s=30)
    registry.register(worker("w", incarnation="first"))
    with KVEventReader(redis_url) as reader:
        old = KVEventPublisher(redis_url, "w", incarnation="first")
        old.publish(chain("old", 3))
        assert old.flush()
        assert events_of(read_all(reader), "w") == [RESET, *chain("old", 3)]
        old.close(delete_stream=False)  # as if the process died

        registry.register(worker("w", incarnation="second"))
        with KVEventPublisher(redis_url, "w", incarnation="second") as new:
            new.publish(chain("new", 2))
            assert new.flush()
            assert events_of(read_all(reader), "w") == [RESET, *chain("new", 2)]
            # The old incarnation's entries were trimmed: a fresh reader sees only the new.
            with KVEventReader(redis_url) as fresh:
                assert events_of(read_all(fresh), "w") == [RESET, *chain("new", 2)]
        # A clean close deletes the stream: the cache it described is gone.
        client = redis.Redis.from_url(redis_url)
        assert client.exists(new.stream) == 0
        client.close()
    registry.close()


# -- Redis outages (RELIABILITY target 13) ------------------------------------------------------


def test_publishing_while_redis_is_down_never_raises_and_counts_drops(private_redis):
    url = private_redis.url
    registry = WorkerRegistry(url, ttl_s=30)
    registry.register(worker("w"))
    publisher = KVEventPublisher(url, "w", max_buffered=5, probe_interval_s=0.1)
    reader = KVEventReader(url)
    try:
        publisher.publish(chain("before", 2))
        assert publisher.flush()
        assert events_of(read_all(reader), "w") == [RESET, *chain("before", 2)]

        private_redis.stop()
        events = chain("down", 8)
        publisher.publish(events[:3])
        publisher.publish(events[3:])
        assert publisher.dropped == 3 and publisher.pending == 5
        assert not publisher.resync_needed  # no point in a snapshot while Redis is down
        assert registry.heartbeat() is False
        with pytest.raises(ControlPlaneUnavailable):
            registry.live_workers()
        with pytest.raises(ControlPlaneUnavailable):
            reader.read()

        private_redis.start()  # same port, empty
        assert wait_for(lambda: publisher.resync_needed, RECOVERY_S)
        assert publisher.flush()
        assert registry.heartbeat() is True
        # Redis lost everything: the reader resets the worker, then reads its new stream:
        # the 5 events that fit in the buffer, in order.
        assert events_of(read_all(reader), "w") == [RESET, *events[:5]]

        snapshot = chain("snap", 3)
        publisher.publish_snapshot(snapshot)
        assert not publisher.resync_needed
        after = chain("after", 2)
        publisher.publish(after)
        assert publisher.flush()
        assert events_of(read_all(reader), "w") == [RESET, *snapshot, *after]
        # The snapshot's reset trimmed what came before it.
        with KVEventReader(url) as fresh:
            assert events_of(read_all(fresh), "w") == [RESET, *snapshot, *after]
    finally:
        publisher.close()
        reader.close()
        registry.close()


def test_a_pending_snapshot_is_never_pushed_out_by_later_events(private_redis):
    url = private_redis.url
    registry = WorkerRegistry(url, ttl_s=30)
    registry.register(worker("w"))
    publisher = KVEventPublisher(url, "w", max_buffered=2, probe_interval_s=0.1)
    reader = KVEventReader(url)
    try:
        assert publisher.flush()
        assert events_of(read_all(reader), "w") == [RESET]
        private_redis.stop()
        snapshot, later = chain("snap", 4), chain("later", 3)
        publisher.publish_snapshot(snapshot)
        publisher.publish(later)
        assert publisher.pending == 1 + 4 + 2 and publisher.dropped == 1
        private_redis.start()
        assert wait_for(lambda: publisher.resync_needed, RECOVERY_S)
        assert publisher.flush()
        registry.heartbeat()
        # The epoch reset, then the whole snapshot and the two later events that fit.
        assert events_of(read_all(reader), "w") == [RESET, RESET, *snapshot, *later[:2]]
    finally:
        publisher.close()
        reader.close()
        registry.close()


def test_registry_and_publisher_recover_after_redis_restart(private_redis):
    url = private_redis.url
    registry = WorkerRegistry(url, ttl_s=2)
    info = worker("w")
    registry.register(info)
    registry.start_heartbeats(interval_s=0.5, load_fn=lambda: WorkerLoad(running=1))
    publisher = KVEventPublisher(url, "w", incarnation=info.incarnation, probe_interval_s=0.2)
    observer = WorkerRegistry(url)
    reader = KVEventReader(url)
    try:
        publisher.publish(chain("before", 3))
        assert publisher.flush()
        assert events_of(read_all(reader), "w") == [RESET, *chain("before", 3)]

        canary = redis.Redis.from_url(url)
        canary.set("canary", "1")
        private_redis.restart()
        assert canary.get("canary") is None  # Redis came back empty
        canary.close()

        def registered() -> bool:
            try:
                return observer.get("w") is not None
            except ControlPlaneUnavailable:
                return False

        assert wait_for(registered, RECOVERY_S)
        got = observer.get("w")
        assert got.incarnation == info.incarnation and got.load.running == 1
        # The publisher notices the empty Redis by itself (no event needed) and asks
        # the engine for a snapshot.
        assert wait_for(lambda: publisher.resync_needed, RECOVERY_S)
        publisher.publish_snapshot(chain("before", 3))
        after = chain("after", 2)
        publisher.publish(after)
        assert publisher.flush(RECOVERY_S)
        assert events_of(read_all(reader), "w") == [
            RESET,  # the reader saw the epoch change
            RESET,  # the snapshot's reset
            *chain("before", 3),
            *after,
        ]
    finally:
        publisher.close()
        reader.close()
        observer.close()
        registry.close()


def test_password_is_used_and_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    secret = "hunter2-secret"
    with LocalRedis(password=secret) as server:
        wrong = WorkerRegistry(server.url.replace(secret, "wrong"))
        with pytest.raises(redis.AuthenticationError):
            wrong.register(worker("w"))  # a configuration error: loud, not retried forever
        wrong.close()
        registry = WorkerRegistry(server.url, ttl_s=30)
        assert registry.register(worker("w"))
        publisher = KVEventPublisher(server.url, "w", probe_interval_s=0.1)
        assert publisher.flush()
        server.stop()
        assert registry.heartbeat() is False
        assert wait_for(lambda: not publisher.connected, RECOVERY_S)
        server.start()
        assert wait_for(lambda: publisher.connected, RECOVERY_S)
        assert registry.heartbeat() is True
        publisher.close()
        registry.close()
    messages = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any(f"redis://:***@127.0.0.1:{server.port}/0" in m for m in messages)
    assert not [m for m in messages if secret in m]
