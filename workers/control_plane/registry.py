"""The worker registry: who is alive, what it can do, how loaded it is.

Each worker writes one JSON record under `tandem:{cluster}:worker:{replica}` with a TTL
and rewrites the whole record on every heartbeat. Rewriting (instead of only refreshing
the TTL) is what makes re-registration automatic: after a Redis restart emptied the
database, the next heartbeat puts the worker back. A worker that stops heartbeating
vanishes when its TTL runs out; readers never see an expired record.

The set `tandem:{cluster}:workers` lists replica ids so readers need no SCAN. Readers
prune ids whose record expired; a heartbeat re-adds its own id every time, so a prune
that races with a re-registration heals within one heartbeat interval.

A worker that stops without dying (SIGSTOP, a hung host) keeps its record until the TTL
runs out, which is long (a Redis outage must not empty the registry). A reader given
`stale_after_s` drops sooner a record whose heartbeat stopped advancing: it notes, on
its own monotonic clock, when each record's `updated_at` last changed (no clock is
compared across machines), and a record unchanged for `stale_after_s` is left out until
its heartbeat moves again. A worker known dead (Ray says its actor died) can be
`evict`ed by anyone: its record goes at once, and only if it still is that incarnation.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import redis

from tandem.workers.control_plane.connection import (
    KeySpace,
    OutageLog,
    check_epoch,
    is_connection_error,
    make_client,
    new_incarnation,
    raise_if_unavailable,
)

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[str, ...] = ("prefill", "decode", "both")

# After a failed heartbeat the loop retries this often (not once per interval), so a
# worker is back in the registry well within RELIABILITY target 13's 5 s after Redis is.
_HEARTBEAT_RETRY_S = 0.25
_MAX_ID_LEN = 256

# KEYS: the record, the id set; ARGV: the replica id, its incarnation as JSON. The record
# is compact JSON with sorted keys (WorkerInfo.to_json), so its incarnation appears as
# `"incarnation":<json>` exactly.
_EVICT_SCRIPT = """
local record = redis.call('GET', KEYS[1])
if record and string.find(record, '"incarnation":' .. ARGV[2], 1, true) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_text(name: str, value: object, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        kind = "str" if allow_empty else "non-empty str"
        raise ValueError(f"{name} must be a {kind}, got {value!r}")
    if len(value) > _MAX_ID_LEN or not value.isprintable():
        raise ValueError(f"{name} must be printable and at most {_MAX_ID_LEN} chars, got {value!r}")


def _check_endpoint(value: object) -> None:
    _check_text("transfer_endpoint", value, allow_empty=True)
    if value == "":
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"transfer_endpoint must be 'host:port' or '', got {value!r}")


@dataclass(frozen=True)
class WorkerCapacity:
    """What a worker can hold; fixed for the life of an incarnation."""

    max_num_seqs: int
    # Sequences the engine runs at once.
    kv_blocks: tuple[int, ...]
    # Physical KV blocks per KV group, indexed like the model's `kv_groups`.
    block_size: int
    # Tokens per KV block; the router must hash prompts with this very block size.

    def __post_init__(self) -> None:
        _check_int("capacity.max_num_seqs", self.max_num_seqs, 1)
        if not isinstance(self.kv_blocks, tuple) or not self.kv_blocks:
            raise ValueError(f"capacity.kv_blocks must be a non-empty tuple: {self.kv_blocks!r}")
        for count in self.kv_blocks:
            _check_int("capacity.kv_blocks[]", count, 1)
        _check_int("capacity.block_size", self.block_size, 1)


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as of `updated_at` (its own wall clock, seconds since the epoch)."""

    running: int = 0
    # Sequences in the running batch.
    waiting: int = 0
    # Sequences admitted but not yet scheduled.
    queued_prompt_tokens: int = 0
    # Prompt tokens still to prefill (the prefill pool's scaling signal).
    kv_usage: float = 0.0
    # Fraction of KV blocks in use, 0..1 (the decode pool's scaling signal).
    updated_at: float = 0.0
    # Set by the registry when the heartbeat is written.

    def __post_init__(self) -> None:
        _check_int("load.running", self.running, 0)
        _check_int("load.waiting", self.waiting, 0)
        _check_int("load.queued_prompt_tokens", self.queued_prompt_tokens, 0)
        if not isinstance(self.kv_usage, int | float) or not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"load.kv_usage must be within [0, 1], got {self.kv_usage!r}")
        if not isinstance(self.updated_at, int | float) or not math.isfinite(self.updated_at):
            raise ValueError(f"load.updated_at must be a finite number, got {self.updated_at!r}")


@dataclass(frozen=True)
class WorkerInfo:
    """One worker's registry record (stored as JSON)."""

    replica_id: str
    # Stable name of the worker (the Ray Serve replica id); part of key and stream names.
    role: Role
    # "prefill", "decode" or "both" (a worker that can do either, e.g. the local default).
    model: str
    # Model id; routers pair only workers serving the same model.
    capacity: WorkerCapacity
    transfer_endpoint: str = ""
    # "host:port" of the KV-transfer rendezvous, or "" for a worker that does not transfer.
    incarnation: str = field(default_factory=new_incarnation)
    # Changes whenever the worker process restarts: its KV cache then starts empty, and
    # readers drop what they knew about the old incarnation.
    load: WorkerLoad = field(default_factory=WorkerLoad)

    def __post_init__(self) -> None:
        _check_text("replica_id", self.replica_id)
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        _check_text("model", self.model)
        if not isinstance(self.capacity, WorkerCapacity):
            raise ValueError(f"capacity must be a WorkerCapacity, got {type(self.capacity)}")
        _check_endpoint(self.transfer_endpoint)
        _check_text("incarnation", self.incarnation)
        if not isinstance(self.load, WorkerLoad):
            raise ValueError(f"load must be a WorkerLoad, got {type(self.load)}")

    def serves(self, role: str) -> bool:
        """Whether this worker can take `role` work ("both" serves prefill and decode)."""
        return self.role == role or (self.role == "both" and role in ("prefill", "decode"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WorkerInfo:
        """Parse a record; unknown keys are ignored so older readers accept newer writers."""
        try:
            data = json.loads(text)
            capacity = data["capacity"]
            load = data.get("load", {})
            return cls(
                replica_id=data["replica_id"],
                role=data["role"],
                model=data["model"],
                capacity=WorkerCapacity(
                    max_num_seqs=capacity["max_num_seqs"],
                    kv_blocks=tuple(capacity["kv_blocks"]),
                    block_size=capacity["block_size"],
                ),
                transfer_endpoint=data.get("transfer_endpoint", ""),
                incarnation=data["incarnation"],
                load=WorkerLoad(
                    **{k: load[k] for k in WorkerLoad.__dataclass_fields__ if k in load}
                ),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"malformed worker record: {type(error).__name__}: {error}") from None


def fetch_live_workers(client: redis.Redis, keys: KeySpace) -> list[WorkerInfo]:
    """Every unexpired, well-formed record, sorted by replica id; prunes expired ids.

    Shared by the registry and the KV event reader (which discovers streams with it).
    Raises redis errors; callers translate them.
    """
    replica_ids = sorted(client.smembers(keys.workers))
    if not replica_ids:
        return []
    records = client.mget([keys.worker(r) for r in replica_ids])
    workers, expired = [], []
    for replica_id, record in zip(replica_ids, records, strict=True):
        if record is None:
            expired.append(replica_id)
            continue
        try:
            workers.append(WorkerInfo.from_json(record))
        except ValueError as error:
            logger.warning("ignoring worker record of %r: %s", replica_id, error)
    if expired:
        client.srem(keys.workers, *expired)
    return workers


class WorkerRegistry:
    """Registry access for one worker (register, heartbeat) and for readers (live_workers).

    A worker process calls `register(info)` once, then `start_heartbeats(...)`; the
    heartbeat thread rewrites the record every interval and never raises. Routers call
    `live_workers()` / `get()`, which raise `ControlPlaneUnavailable` while Redis is
    unreachable so the caller can keep its last view (degraded routing) instead of
    mistaking an outage for an empty cluster.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        ttl_s: float = 10.0,
        cluster: str = "default",
        stale_after_s: float | None = None,
        alive: Callable[[list[WorkerInfo]], list[WorkerInfo]] | None = None,
    ) -> None:
        """stale_after_s: readers leave out a record whose heartbeat has not advanced for
        this long (module docstring); None: only expiry removes records. alive: a further
        filter of what readers see (the cluster layer's: workers whose process is known
        dead), called off the event loop by readers that poll."""
        if not isinstance(ttl_s, int | float) or not 0.1 <= ttl_s <= 3600:
            raise ValueError(f"ttl_s must be within [0.1, 3600] seconds, got {ttl_s!r}")
        if stale_after_s is not None and not 0 < stale_after_s:
            raise ValueError(f"stale_after_s must be > 0 or None, got {stale_after_s!r}")
        self.ttl_s = float(ttl_s)
        self.stale_after_s = stale_after_s
        self._alive = alive
        self._heartbeats_seen: dict[str, tuple[float, float]] = {}
        # reader side: replica id -> (its record's updated_at, when that value was first
        # seen here, time.monotonic())
        self.keys = KeySpace(cluster)
        self._client = make_client(redis_url)
        self._outage = OutageLog(logger, "worker registry", redis_url)
        self._lock = threading.Lock()
        self._info: WorkerInfo | None = None
        self._epoch: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeats_written = 0
        self.heartbeat_failures = 0

    # -- worker side ---------------------------------------------------------------------

    @property
    def info(self) -> WorkerInfo | None:
        """The record this registry writes for its worker (None before `register`)."""
        return self._info

    def register(self, info: WorkerInfo) -> bool:
        """Write `info` and remember it for heartbeats; True if Redis took it now.

        False means Redis is unreachable: the heartbeat thread keeps trying, so a worker
        started during a Redis outage appears as soon as Redis is back.
        """
        if not isinstance(info, WorkerInfo):
            raise ValueError(f"info must be a WorkerInfo, got {type(info)}")
        with self._lock:
            if self._info is not None and self._info.replica_id != info.replica_id:
                raise ValueError(
                    f"this registry already registered {self._info.replica_id!r}; "
                    f"use another WorkerRegistry for {info.replica_id!r}"
                )
            self._info = replace(info, load=replace(info.load, updated_at=time.time()))
        return self._write()

    def heartbeat(self, load: WorkerLoad | None = None) -> bool:
        """Refresh the record's TTL (and its load, if given); True if Redis took it."""
        with self._lock:
            if self._info is None:
                raise RuntimeError("heartbeat() before register()")
            new_load = self._info.load if load is None else load
            self._info = replace(self._info, load=replace(new_load, updated_at=time.time()))
        return self._write()

    def start_heartbeats(
        self,
        interval_s: float | None = None,
        load_fn: Callable[[], WorkerLoad] | None = None,
    ) -> None:
        """Heartbeat from a daemon thread every `interval_s` (default ttl_s / 3).

        `load_fn` is called on that thread for the current load; if it raises, the
        heartbeat still goes out with the previous load (liveness is not the engine's
        health check).
        """
        interval = self.ttl_s / 3 if interval_s is None else interval_s
        if not isinstance(interval, int | float) or not 0 < interval < self.ttl_s:
            raise ValueError(f"interval_s must be within (0, ttl_s={self.ttl_s}), got {interval!r}")
        if self._info is None:
            raise RuntimeError("start_heartbeats() before register()")
        if self._thread is not None:
            raise RuntimeError("heartbeats already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat_loop,
            args=(float(interval), load_fn),
            name=f"tandem-heartbeat-{self._info.replica_id}",
            daemon=True,
        )
        self._thread.start()

    def stop_heartbeats(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def deregister(self) -> bool:
        """Stop heartbeats and delete the record; True if Redis took it (else it expires)."""
        self.stop_heartbeats()
        with self._lock:
            info, self._info = self._info, None
        if info is None:
            return True
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self.keys.worker(info.replica_id))
            pipe.srem(self.keys.workers, info.replica_id)
            pipe.execute()
            return True
        except redis.RedisError as error:
            if not is_connection_error(error):
                raise
            self._outage.failed(error)
            return False

    def _write(self) -> bool:
        with self._lock:
            info = self._info
        assert info is not None
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self.keys.worker(info.replica_id), info.to_json(), px=int(self.ttl_s * 1000))
        pipe.sadd(self.keys.workers, info.replica_id)
        check_epoch(pipe, self.keys)
        try:
            epoch = pipe.execute()[-1]
        except redis.RedisError as error:
            if not is_connection_error(error):
                raise
            self.heartbeat_failures += 1
            self._outage.failed(error)
            return False
        if self._epoch is not None and epoch != self._epoch:
            logger.info("worker registry: redis lost its data; %s re-registered", info.replica_id)
        self._epoch = epoch
        self.heartbeats_written += 1
        self._outage.succeeded()
        return True

    def _heartbeat_loop(self, interval: float, load_fn: Callable[[], WorkerLoad] | None) -> None:
        while not self._stop.is_set():
            load = None
            if load_fn is not None:
                try:
                    load = load_fn()
                except Exception:
                    logger.exception("worker registry: load_fn failed; heartbeat keeps old load")
            try:
                ok = self.heartbeat(load)
            except Exception:
                # A bad password or a bug must not kill liveness silently: log and go on.
                logger.exception("worker registry: heartbeat failed")
                ok = False
            self._stop.wait(interval if ok else min(interval, _HEARTBEAT_RETRY_S))

    # -- reader side ---------------------------------------------------------------------

    def live_workers(self, role: str | None = None) -> list[WorkerInfo]:
        """Unexpired workers sorted by replica id; `role` keeps those that serve it
        ("prefill" and "decode" include "both" workers; "both" only those)."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
        try:
            workers = fetch_live_workers(self._client, self.keys)
        except redis.RedisError as error:
            raise_if_unavailable(error)
            raise
        if self.stale_after_s is not None:
            workers = self._fresh(workers)
        if self._alive is not None:
            workers = self._alive(workers)
        return [w for w in workers if role is None or w.serves(role)]

    def _fresh(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        """The workers whose heartbeat advanced within stale_after_s of this clock."""
        now = time.monotonic()
        with self._lock:
            seen = self._heartbeats_seen
            fresh = []
            for w in workers:
                known = seen.get(w.replica_id)
                if known is None or known[0] != w.load.updated_at:
                    known = seen[w.replica_id] = (w.load.updated_at, now)
                if now - known[1] < self.stale_after_s:
                    fresh.append(w)
            if len(seen) > 2 * len(workers) + 16:
                listed = {w.replica_id for w in workers}
                for rid in [rid for rid in seen if rid not in listed]:
                    del seen[rid]
        return fresh

    def evict(self, replica_id: str, incarnation: str) -> bool:
        """Delete a dead worker's record now, if it still holds `incarnation` (a worker
        that restarted under the same id keeps its new record). True if deleted."""
        try:
            return bool(
                self._client.eval(
                    _EVICT_SCRIPT,
                    2,
                    self.keys.worker(replica_id),
                    self.keys.workers,
                    replica_id,
                    json.dumps(incarnation),
                )
            )
        except redis.RedisError as error:
            raise_if_unavailable(error)
            raise

    def get(self, replica_id: str) -> WorkerInfo | None:
        """The worker's record, or None if it never registered or expired."""
        try:
            record = self._client.get(self.keys.worker(replica_id))
        except redis.RedisError as error:
            raise_if_unavailable(error)
            raise
        return None if record is None else WorkerInfo.from_json(record)

    def close(self) -> None:
        """Stop heartbeats and drop the connection (the record expires on its own)."""
        self.stop_heartbeats()
        self._client.close()

    def __enter__(self) -> WorkerRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
