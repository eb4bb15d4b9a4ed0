"""Publishes one worker's KV block events to its Redis stream without ever stalling the engine.

`publish()` only appends to an in-memory buffer; a daemon thread moves the buffer to
Redis in pipelined batches (XADD with approximate MAXLEN trimming). While Redis is down
the buffer holds up to `max_buffered` events; beyond that new events are dropped and
counted. Sequence numbers are assigned at `publish()` time, dropped events included, so
a drop leaves a gap that every reader notices (and answers with a reset for this worker,
see `reader.py`). Dropping the newest rather than the oldest keeps a pending snapshot
whole.

Getting readers complete again after a loss is the engine's job, because only it knows
its cache: when `resync_needed` turns True (events were dropped and Redis is back, or
Redis lost its data in a restart), the engine calls `publish_snapshot()` with a stored
event for every block it has cached. That writes a reset followed by the snapshot.

    engine thread                    flusher thread                   Redis
    publish([e1, e2]) -> buffer      batch = buffer[:1000]
                                     XADD..XADD, PEXPIRE, epoch  ---> stream
                                     pop what was written
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

import redis

from tandem.workers.control_plane.connection import (
    KeySpace,
    OutageLog,
    check_epoch,
    is_connection_error,
    make_client,
    new_incarnation,
    validate_cluster_name,
)
from tandem.workers.control_plane.events import KVEvent, encode_event

logger = logging.getLogger(__name__)

_BATCH = 1000
# Between failed flushes the thread backs off exponentially up to this, so it is back
# within about half a second of Redis (RELIABILITY target 13 asks for 5 s).
_RETRY_BASE_S = 0.05
_RETRY_CAP_S = 0.5


class KVEventPublisher:
    """The KV event stream writer of one worker incarnation.

    Contract: `publish()` and `publish_snapshot()` never block on Redis and never raise
    because of it; they are safe to call from the engine loop. Only `close()` and
    `flush()` wait (bounded by their timeouts).
    """

    def __init__(
        self,
        redis_url: str,
        replica_id: str,
        *,
        incarnation: str | None = None,
        cluster: str = "default",
        maxlen: int = 100_000,
        max_buffered: int = 100_000,
        probe_interval_s: float = 1.0,
        stream_ttl_s: float = 3600.0,
    ) -> None:
        """
        incarnation: the worker's `WorkerInfo.incarnation` (a fresh id if None).
        maxlen: approximate bound on the stream's length (XADD MAXLEN ~).
        max_buffered: events kept in memory while Redis is unreachable (besides a pending
            snapshot); further events are dropped.
        probe_interval_s: while idle, how often the thread checks that Redis still has
            this worker's data (a restart empties it) and refreshes the stream's TTL.
        stream_ttl_s: the stream of a worker that died without `close()` expires after this.
        """
        if not isinstance(replica_id, str) or not replica_id or not replica_id.isprintable():
            raise ValueError(f"replica_id must be a non-empty printable str, got {replica_id!r}")
        validate_cluster_name(cluster)
        for name, value, low in (("maxlen", maxlen, 1), ("max_buffered", max_buffered, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(probe_interval_s, int | float) or not 0 < probe_interval_s <= 60:
            raise ValueError(f"probe_interval_s must be within (0, 60], got {probe_interval_s!r}")
        if not isinstance(stream_ttl_s, int | float) or stream_ttl_s < 4 * probe_interval_s:
            raise ValueError(f"stream_ttl_s must be >= 4 * probe_interval_s, got {stream_ttl_s!r}")
        self.replica_id = replica_id
        self.incarnation = new_incarnation() if incarnation is None else incarnation
        if not isinstance(self.incarnation, str) or not self.incarnation.isprintable():
            raise ValueError(f"incarnation must be a printable str, got {self.incarnation!r}")
        self.keys = KeySpace(cluster)
        self.stream = self.keys.kv_stream(replica_id)
        self.maxlen = maxlen
        self.max_buffered = max_buffered
        self._probe_interval_s = float(probe_interval_s)
        self._stream_ttl_ms = int(stream_ttl_s * 1000)
        self._client = make_client(redis_url)
        self._outage = OutageLog(logger, f"kv events of {replica_id}", redis_url)

        self._cond = threading.Condition()
        self._buffer: deque[tuple[int, KVEvent]] = deque()  # (seq, event), seq increasing
        self._next_seq = 0
        # Entries of the latest snapshot that are still in the buffer (outside the bound).
        self._snapshot_left = 0
        self._snapshot_last_seq = -1
        self._lost_since_snapshot = False
        self._resync_needed = False
        self._epoch: str | None = None
        self._closing = False
        self.dropped = 0
        self.written = 0
        self.connected = False
        # Every incarnation's stream history starts with a reset: readers drop whatever
        # an earlier incarnation of this replica had published.
        self._enqueue(KVEvent.reset())
        self._thread = threading.Thread(
            target=self._flush_loop, name=f"tandem-kv-events-{replica_id}", daemon=True
        )
        self._thread.start()

    # -- engine side ---------------------------------------------------------------------

    def publish(self, events: Iterable[KVEvent]) -> None:
        """Queue `events` (in order) for the stream; returns at once."""
        events = list(events)
        for event in events:
            if not isinstance(event, KVEvent):
                raise ValueError(f"events must be KVEvent, got {type(event)}")
        if not events:
            return
        with self._cond:
            for event in events:
                self._enqueue(event)
            self._cond.notify_all()

    def publish_snapshot(self, events: Iterable[KVEvent]) -> None:
        """Replace everything unwritten by a reset plus `events` (every cached block).

        The snapshot is not counted against `max_buffered` (it is bounded by the
        worker's block count), so events published after it never push it out.
        """
        events = list(events)
        for event in events:
            if not isinstance(event, KVEvent) or event.kind != "stored":
                raise ValueError(f"a snapshot holds only stored events, got {event!r}")
        with self._cond:
            # Unwritten events describe changes that the snapshot already contains.
            self._buffer.clear()
            self._lost_since_snapshot = False
            self._resync_needed = False
            for event in [KVEvent.reset(), *events]:
                self._buffer.append((self._next_seq, event))
                self._next_seq += 1
            self._snapshot_left = len(self._buffer)
            self._snapshot_last_seq = self._next_seq - 1
            self._cond.notify_all()

    @property
    def resync_needed(self) -> bool:
        """True when readers may have missed events: call `publish_snapshot()`.

        Turns True only once Redis is reachable again, so the engine does not rebuild
        snapshots in vain during an outage.
        """
        return self._resync_needed

    @property
    def pending(self) -> int:
        """Events published but not yet written to Redis."""
        with self._cond:
            return len(self._buffer)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every published event is in Redis; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, *, delete_stream: bool = True, timeout_s: float = 2.0) -> None:
        """Flush (bounded), stop the thread, and by default delete the stream: the cache
        it describes dies with this process."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # Stuck in a connection attempt to an unreachable Redis; it is a daemon thread
            # and exits with the process. The stream expires on its own.
            logger.warning("kv events: %s closed while its writer waits on redis", self.stream)
            return
        if delete_stream:
            try:
                self._client.delete(self.stream)
            except redis.RedisError as error:
                if not is_connection_error(error):
                    raise
                logger.info("kv events: could not delete %s (%s); it expires", self.stream, error)
        self._client.close()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _enqueue(self, event: KVEvent) -> None:
        # Caller holds self._cond (or is the constructor, before the thread exists).
        seq = self._next_seq
        self._next_seq += 1
        if len(self._buffer) - self._snapshot_left >= self.max_buffered:
            self.dropped += 1
            self._lost_since_snapshot = True
            return
        self._buffer.append((seq, event))

    # -- flusher thread ------------------------------------------------------------------

    def _flush_loop(self) -> None:
        failures = 0
        last_write = 0.0
        while True:
            with self._cond:
                if failures:
                    # Back off even when events arrive: each attempt costs the client's
                    # own retries, and new events change nothing about Redis being down.
                    backoff = min(_RETRY_CAP_S, _RETRY_BASE_S * 2 ** (failures - 1))
                    self._wait_until(time.monotonic() + backoff, wake_on_events=False)
                else:
                    self._wait_until(last_write + self._probe_interval_s, wake_on_events=True)
                if self._closing:
                    return
                batch = [self._buffer[i] for i in range(min(_BATCH, len(self._buffer)))]
            try:
                self._write(batch)
            except Exception as error:
                if not is_connection_error(error):
                    logger.exception("kv events: write to %s failed", self.stream)
                self._outage.failed(error)
                self.connected = False
                failures += 1
                continue
            failures = 0
            last_write = time.monotonic()
            self.connected = True
            self._outage.succeeded()
            with self._cond:
                if batch:
                    written_up_to = batch[-1][0]
                    # Only what was written leaves the buffer: drops or a snapshot may
                    # have changed the buffer while the write was in flight.
                    while self._buffer and self._buffer[0][0] <= written_up_to:
                        seq, _ = self._buffer.popleft()
                        if seq <= self._snapshot_last_seq:
                            self._snapshot_left -= 1
                    self.written += len(batch)
                if self._lost_since_snapshot:
                    self._resync_needed = True
                self._cond.notify_all()

    def _wait_until(self, deadline: float, *, wake_on_events: bool) -> None:
        # Caller holds self._cond.
        while not self._closing and not (wake_on_events and self._buffer):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _write(self, batch: list[tuple[int, KVEvent]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for seq, event in batch:
            pipe.xadd(
                self.stream,
                encode_event(event, self.incarnation, seq),
                maxlen=self.maxlen,
                approximate=True,
            )
        pipe.pexpire(self.stream, self._stream_ttl_ms)
        check_epoch(pipe, self.keys)
        replies = pipe.execute()
        epoch = replies[-1]
        if self._epoch is not None and epoch != self._epoch:
            # Redis restarted empty: readers that start now see only part of the cache.
            logger.info("kv events: redis lost its data; %s needs a resync", self.replica_id)
            self._resync_needed = True
        self._epoch = epoch
        resets = [i for i, (_, event) in enumerate(batch) if event.kind == "reset"]
        if resets:
            # Entries before the latest reset describe a cache that no longer exists.
            self._client.xtrim(self.stream, minid=replies[resets[-1]], approximate=False)
