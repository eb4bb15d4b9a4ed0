"""Reads every live worker's KV event stream, in order, and says when to forget a worker.

The consumer (the router's prefix index) applies what `read()` returns in order, per
replica: stored adds a hash, removed drops it, reset drops every hash of that replica.
The reader guarantees that doing so never leaves a hash the worker no longer has, by
turning every way of missing events into a reset:

    seen by the reader                              emitted
    ----------------------------------------------  ------------------------------------
    a reset entry                                   reset (worker restarted or resynced)
    an entry of another incarnation than before     reset, then the entry
    seq jumps past the next expected one (trimmed,  reset, then the entry (the worker's
      dropped while Redis was down, malformed)        later snapshot completes the view)
    seq at or below one already returned            nothing (a duplicate from a retried
                                                      write or a re-read)
    the worker left the registry (expired)          reset (stream id "")
    Redis lost its data (the epoch changed)         reset for every replica; all streams
                                                      are read again from "0"

What is missed can only make the view smaller than the truth (a cache miss at worst),
never larger (a routing decision based on blocks that are gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import redis

from tandem.workers.control_plane.connection import (
    SOCKET_TIMEOUT_S,
    KeySpace,
    check_epoch,
    make_client,
    raise_if_unavailable,
)
from tandem.workers.control_plane.events import KVEvent, decode_event
from tandem.workers.control_plane.registry import fetch_live_workers

logger = logging.getLogger(__name__)


class KVEventEntry(NamedTuple):
    """One event for the consumer. `stream_id` is "" for resets the reader made up for a
    worker that left the registry or for a Redis restart."""

    replica_id: str
    stream_id: str
    event: KVEvent


@dataclass
class _ReplicaCursor:
    stream_id: str = "0"
    # Last entry consumed; "0" reads the stream from its start.
    incarnation: str | None = None
    # Incarnation of the last event returned (None: nothing returned yet).
    next_seq: int = 0


class KVEventReader:
    """Tails the KV streams of the workers in the registry; owns one cursor per stream.

    `read()` raises `ControlPlaneUnavailable` while Redis is unreachable: the consumer
    keeps its current view (degraded routing) and calls again later.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        cluster: str = "default",
        count: int = 1000,
        max_block_ms: int = 5000,
    ) -> None:
        """count: at most this many entries per stream per read.
        max_block_ms: the longest `block_ms` callers may ask for (sizes the socket timeout).
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if isinstance(max_block_ms, bool) or not isinstance(max_block_ms, int) or max_block_ms < 0:
            raise ValueError(f"max_block_ms must be an int >= 0, got {max_block_ms!r}")
        self.keys = KeySpace(cluster)
        self.count = count
        self.max_block_ms = max_block_ms
        self._client = make_client(
            redis_url, socket_timeout_s=SOCKET_TIMEOUT_S + max_block_ms / 1000
        )
        self._cursors: dict[str, _ReplicaCursor] = {}
        self._epoch: str | None = None
        self.malformed = 0

    @property
    def positions(self) -> dict[str, str]:
        """Stream name -> id of the last entry consumed, for the streams being tailed."""
        return {self.keys.kv_stream(r): c.stream_id for r, c in self._cursors.items()}

    def read(self, since: Mapping[str, str] | None = None, block_ms: int = 0) -> list[KVEventEntry]:
        """New events of every live worker, in stream order per worker.

        since: stream name -> last id the caller has consumed; replaces the reader's own
            cursor for those streams and forgets what it tracked for them, so
            `{stream: "0"}` replays a stream from its start (catch-up after the caller
            lost its view). Streams not named continue from the reader's cursors; a newly
            seen worker is read from "0"; streams of workers not in the registry are ignored.
        block_ms: wait up to this long for an event when there is none (0: do not wait).
        """
        if isinstance(block_ms, bool) or not isinstance(block_ms, int):
            raise ValueError(f"block_ms must be an int, got {block_ms!r}")
        if not 0 <= block_ms <= self.max_block_ms:
            raise ValueError(f"block_ms must be within [0, max_block_ms={self.max_block_ms}]")
        try:
            return self._read(dict(since or {}), block_ms)
        except redis.RedisError as error:
            raise_if_unavailable(error)
            raise

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> KVEventReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self, since: dict[str, str], block_ms: int) -> list[KVEventEntry]:
        out: list[KVEventEntry] = []
        pipe = self._client.pipeline(transaction=False)
        check_epoch(pipe, self.keys)
        epoch = pipe.execute()[-1]
        if self._epoch is not None and epoch != self._epoch:
            logger.info("kv events: redis lost its data; re-reading every stream from the start")
            out += [KVEventEntry(r, "", KVEvent.reset()) for r in sorted(self._cursors)]
            self._cursors.clear()
        self._epoch = epoch

        live = {w.replica_id for w in fetch_live_workers(self._client, self.keys)}
        for replica_id in sorted(set(self._cursors) - live):
            # Its cache is unreachable now; if it comes back its stream is read again.
            out.append(KVEventEntry(replica_id, "", KVEvent.reset()))
            del self._cursors[replica_id]
        for replica_id in live:
            self._cursors.setdefault(replica_id, _ReplicaCursor())
        for stream, stream_id in since.items():
            replica_id = self.keys.replica_of_stream(stream)
            if replica_id in live:
                self._cursors[replica_id] = _ReplicaCursor(stream_id=stream_id)

        if not self._cursors:
            if block_ms and not out:
                # Nothing to block on: wait here so a polling caller does not spin.
                time.sleep(block_ms / 1000)
            return out
        streams = {self.keys.kv_stream(r): c.stream_id for r, c in sorted(self._cursors.items())}
        block = block_ms if block_ms and not out else None
        replies = self._client.xread(streams, count=self.count, block=block) or []
        for stream, entries in replies:
            replica_id = self.keys.replica_of_stream(stream)
            cursor = self._cursors[replica_id]
            for stream_id, fields in entries:
                cursor.stream_id = stream_id
                out += self._accept(replica_id, cursor, stream_id, fields)
        return out

    def _accept(
        self, replica_id: str, cursor: _ReplicaCursor, stream_id: str, fields: dict[str, str]
    ) -> list[KVEventEntry]:
        try:
            event, incarnation, seq = decode_event(fields)
        except ValueError as error:
            # Skipped; the next entry's seq shows the gap, which resets this replica.
            self.malformed += 1
            logger.warning("kv events: skipping entry %s of %s: %s", stream_id, replica_id, error)
            return []
        if incarnation == cursor.incarnation and seq < cursor.next_seq:
            return []
        entry = KVEventEntry(replica_id, stream_id, event)
        if event.kind == "reset" or cursor.incarnation is None:
            out = [entry]
        elif incarnation != cursor.incarnation or seq > cursor.next_seq:
            out = [KVEventEntry(replica_id, stream_id, KVEvent.reset()), entry]
        else:
            out = [entry]
        cursor.incarnation = incarnation
        cursor.next_seq = seq + 1
        return out
