"""Which prefill peers a decode worker must not wait for (RELIABILITY targets 2 and 19).

A decode worker that hands a prompt to a prefill peer waits for the call's reply. A peer
that died, stopped (SIGSTOP, a hung host) or is leaving never replies, and a request
would wait out the whole transfer deadline (10 s). The cluster knows much sooner: Ray
knows an actor is dead at once, the registry knows a heartbeat stopped. PeerWatch turns
that knowledge into two answers on the decode worker's event loop:

    probe(peers) -> the gone ones      (the cluster layer's, every `interval_s`,
          │                             off the event loop)
          v
    PeerWatch ── is_gone(p)        before a call: prefill locally at once
              ── race(call, p)     while a call waits: PeerGone as soon as a probe
                                   finds p gone, however long the deadline
              ── mark_gone(p, s)   what a failed call proved (the actor died, the pin
                                   missed): p skipped for `s` seconds without probing

Only peers someone waits for, or already found gone, are probed: an idle decode worker
costs the control plane nothing, and a peer that comes back (its heartbeat advances
again) is un-gone by the next probe. No Ray, no Redis here: the probe is injected.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

Probe = Callable[[frozenset[str]], frozenset[str]]
"""Given peer replica ids, the subset that is gone now. Blocking (it may ask Ray and
Redis); PeerWatch runs it in a thread. It must not raise for a peer it cannot judge: an
unknown peer is not gone."""

# Peers remembered as gone at most; the oldest marks are dropped first (Serve never
# reuses a replica id, so a dead peer is only ever asked about until placement learns).
_MAX_GONE = 1024


class PeerGone(ConnectionError):
    """The prefill peer a call waits on is gone (dead, stopped, or leaving)."""

    def __init__(self, peer: str) -> None:
        super().__init__(f"prefill peer {peer!r} is gone")
        self.peer = peer


class PeerWatch:
    """Gone peers as the probe and failed calls report them. Use from one event loop;
    `start()` there, `close()` at the end."""

    def __init__(
        self, probe: Probe, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"PeerWatch.interval_s must be > 0, got {interval_s}")
        self._probe = probe
        self.interval_s = interval_s
        self._clock = clock
        self._gone_until: dict[str, float] = {}
        # peer -> until when it counts as gone (math.inf: until a probe clears it)
        self._waiting: Counter[str] = Counter()
        # peers calls are waiting on now, with how many calls
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.probes = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def is_gone(self, peer: str) -> bool:
        until = self._gone_until.get(peer)
        if until is None:
            return False
        if until <= self._clock():
            del self._gone_until[peer]
            return False
        return True

    def mark_gone(self, peer: str, for_s: float = math.inf) -> None:
        """`peer` counts as gone for `for_s` seconds (inf: until a probe clears it)."""
        if len(self._gone_until) >= _MAX_GONE and peer not in self._gone_until:
            del self._gone_until[next(iter(self._gone_until))]
        self._gone_until[peer] = self._clock() + for_s
        self._wake()

    async def race(self, call: Awaitable[T], peer: str) -> T:
        """`call`'s result, or PeerGone as soon as `peer` is found gone (the call is
        then cancelled). Cancelling this cancels the call."""
        future = asyncio.ensure_future(call)
        self._waiting[peer] += 1
        try:
            while not future.done():
                if self.is_gone(peer):
                    future.cancel()
                    raise PeerGone(peer)
                self._changed.clear()
                changed = asyncio.ensure_future(self._changed.wait())
                try:
                    await asyncio.wait({future, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
            return future.result()
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            self._waiting[peer] -= 1
            if not self._waiting[peer]:
                del self._waiting[peer]

    def _wake(self) -> None:
        self._changed.set()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            asked = frozenset(self._waiting) | {
                p for p, until in self._gone_until.items() if until == math.inf
            }
            if not asked:
                continue
            try:
                gone = await asyncio.to_thread(self._probe, asked)
            except Exception:  # a failing probe must not end the watch; peers keep state
                log.exception("probing prefill peers failed")
                continue
            self.probes += 1
            for peer in asked:
                if peer in gone:
                    if not self.is_gone(peer):
                        log.warning("prefill peer %s is gone; prefilling locally", peer)
                        self.mark_gone(peer)
                elif self._gone_until.get(peer) == math.inf:
                    log.info("prefill peer %s is back", peer)
                    del self._gone_until[peer]
            self._wake()
