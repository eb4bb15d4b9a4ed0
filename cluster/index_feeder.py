"""Keeps an ingress replica's PrefixIndex equal to the workers' prefix caches, from Redis.

    worker w ── stored / removed / reset ──> Redis stream tandem:{cluster}:kv:{w}
                                                  │ XREAD (KVEventReader, one thread)
    PrefixIndexFeeder (ingress event loop) <──────┘
        apply(entries) -> PrefixIndex.stored / removed / reset

Every ingress replica runs one feeder over the same streams, so every replica builds
the same index: placement does not depend on which replica a request reaches. The
reader starts every stream at "0", so a restarted ingress replays each worker's history
and arrives at the view the others have (a worker's stream starts with a reset, and is
replaced by a reset and a snapshot whenever its readers may have lost events). What the
reader cannot deliver it turns into resets (see workers/control_plane/reader.py): gaps,
restarted workers, workers whose heartbeat expired (their blocks leave the index with
them), and a Redis that lost its data. So the index may trail the caches by an event
flush, and may miss blocks after a loss, but never holds a block a worker has dropped.

The blocking XREAD runs in a worker thread; entries are applied on the event loop, the
only place the index is read, so the index needs no lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterable

from tandem.router.prefix_index import PrefixIndex
from tandem.workers.control_plane import ControlPlaneUnavailable, KVEventEntry, KVEventReader

log = logging.getLogger(__name__)

# While Redis is down the feeder keeps its index (degraded placement) and retries this often.
_RETRY_S = 0.5


class PrefixIndexFeeder:
    """Owns a PrefixIndex and the KVEventReader that feeds it. Call `start()` on the
    event loop that places requests; `close()` stops the task and the reader."""

    def __init__(self, reader: KVEventReader, *, block_ms: int = 200) -> None:
        """block_ms: how long one read waits for new events (bounds `close()` too)."""
        if not 0 < block_ms <= reader.max_block_ms:
            raise ValueError(
                f"block_ms must be within (0, reader.max_block_ms={reader.max_block_ms}], "
                f"got {block_ms}"
            )
        self.index = PrefixIndex()
        self._reader = reader
        self._block_ms = block_ms
        self._task: asyncio.Task | None = None
        self._reading: asyncio.Future | None = None
        self.applied = 0
        # Events applied since start, resets included.
        self.resets = 0

    async def start(self) -> None:
        """Catch up with every stream (a restarted ingress replays them), then follow."""
        try:
            await self.catch_up()
        except ControlPlaneUnavailable as err:
            log.warning("prefix index: redis unreachable at start, following later: %s", err)
        self._task = asyncio.create_task(self._follow(), name="tandem-prefix-index")

    async def catch_up(self) -> int:
        """Read until a read reaches the end of every stream (it returns fewer entries
        than one stream's batch); returns the number of events applied. Bounded even
        while the workers keep publishing."""
        total = 0
        while True:
            entries = await self._read(0)
            total += self.apply(entries)
            if len(entries) < self._reader.count:
                return total

    async def _read(self, block_ms: int) -> list[KVEventEntry]:
        # Shielded: cancelling the caller leaves the thread's read to finish, and close()
        # waits for it before closing the reader under it.
        self._reading = asyncio.ensure_future(
            asyncio.to_thread(self._reader.read, block_ms=block_ms)
        )
        return await asyncio.shield(self._reading)

    def apply(self, entries: Iterable[KVEventEntry]) -> int:
        """Apply entries in order; returns how many."""
        count = 0
        for replica_id, _, event in entries:
            if event.kind == "stored":
                self.index.stored(replica_id, event.group, event.block_hash)
            elif event.kind == "removed":
                self.index.removed(replica_id, event.group, event.block_hash)
            else:
                self.index.reset(replica_id)
                self.resets += 1
            count += 1
        self.applied += count
        return count

    async def _follow(self) -> None:
        failing = False
        while True:
            try:
                entries = await self._read(self._block_ms)
            except ControlPlaneUnavailable as err:
                if not failing:
                    log.warning("prefix index: redis unreachable, keeping the last view: %s", err)
                failing = True
                await asyncio.sleep(_RETRY_S)
                continue
            except Exception:  # a bug here must not end placement by prefix
                log.exception("prefix index: reading KV events failed")
                await asyncio.sleep(_RETRY_S)
                continue
            if failing:
                log.info("prefix index: redis reachable again")
                failing = False
            self.apply(entries)

    def digest(self, workers: Iterable[str] | None = None) -> str:
        """SHA-256 over the sorted (worker, group, hash) entries: equal digests, equal
        views (how ingress replicas, and tests, compare their indexes)."""
        h = hashlib.sha256()
        names = sorted(self.index.workers if workers is None else workers)
        for worker in names:
            for group, block_hash in sorted(self.index.blocks(worker)):
                h.update(f"{worker}\0{group}\0{block_hash.hex()}\n".encode())
        return h.hexdigest()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._reading is not None:
            # A read still blocked in its thread returns within block_ms.
            await asyncio.gather(self._reading, return_exceptions=True)
        await asyncio.to_thread(self._reader.close)
