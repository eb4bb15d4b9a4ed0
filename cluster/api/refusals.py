"""A budget of refused requests per client connection (RELIABILITY targets 10 and 18).

Input limits (limits.py) make each invalid request cheap to refuse, but not free: it is
received, scanned and answered, ~1-6 ms of the front's CPU for the largest. A client
that sends them back to back would still take a share of the front that normal clients
then wait for (bench/hostile_input.py measured it halving their throughput). So each
client connection gets a token bucket of refusals:

    refused for bad input (INVALID_ARGUMENT / 4xx) ──> charge(client): one token
    next request of a client whose bucket is empty ──> RESOURCE_EXHAUSTED / 429 with
        retry-after, before its bytes are parsed; held (tarpit) up to `tarpit_s` first,
        so a client that waits for each answer sends no faster than the bucket refills

Valid requests cost no tokens: a client making a few mistakes is never throttled.
Clients are keyed by connection (the peer's address and port), never by address alone:
clients behind one proxy or NAT share an address, and one of them flooding must not
throttle the others; a flooder that reconnects pays a TCP (and TLS) handshake each time.
The table of clients is bounded (least recently charged dropped first), and so is the
number of calls held in the tarpit at once (beyond it, refusals are immediate).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RefusalBudgetConfig:
    burst: int = 32
    # Refusals a connection may receive in a row before it is throttled.
    per_s: float = 4.0
    # Refusals a connection earns back each second.
    tarpit_s: float = 1.0
    # Longest a throttled call is held before its RESOURCE_EXHAUSTED (0: answer at once).
    max_clients: int = 65536
    # Connections tracked at once; the least recently charged are forgotten first.
    max_held: int = 256
    # Throttled calls held in the tarpit at once; beyond, refused at once.

    def __post_init__(self) -> None:
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"RefusalBudgetConfig.burst must be an int >= 1, got {self.burst!r}")
        if not (math.isfinite(self.per_s) and self.per_s > 0):
            raise ValueError(f"RefusalBudgetConfig.per_s must be > 0, got {self.per_s!r}")
        if not (math.isfinite(self.tarpit_s) and self.tarpit_s >= 0):
            raise ValueError(f"RefusalBudgetConfig.tarpit_s must be >= 0, got {self.tarpit_s!r}")
        for name in ("max_clients", "max_held"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RefusalBudgetConfig.{name} must be an int >= 1, got {value!r}")


class Throttled(Exception):
    """The client used up its refusals; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            f"too many invalid requests on this connection; retry after {retry_after_s:.1f} s"
        )
        self.retry_after_s = retry_after_s


class RefusalBudget:
    """Per-client token buckets of refusals. One event loop (or one thread) only."""

    def __init__(
        self, config: RefusalBudgetConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # client -> (tokens at `when`, when)
        self._held = 0
        self.throttled = 0
        # calls refused for an empty bucket so far

    def _tokens(self, client: str, now: float) -> float:
        known = self._buckets.get(client)
        if known is None:
            return float(self.config.burst)
        tokens, when = known
        return min(float(self.config.burst), tokens + (now - when) * self.config.per_s)

    def retry_after(self, client: str) -> float:
        """0 when `client` may be served; else seconds until its next refusal token."""
        if client not in self._buckets:  # the common case: one dict lookup
            return 0.0
        tokens = self._tokens(client, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.config.per_s

    def charge(self, client: str) -> None:
        """One refusal for bad input was answered to `client`."""
        now = self._clock()
        tokens = self._tokens(client, now) - 1.0
        self._buckets[client] = (max(tokens, -float(self.config.burst)), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.config.max_clients:
            self._buckets.popitem(last=False)

    async def admit(self, client: str) -> None:
        """Return when `client` may be served; raise Throttled (after holding the call up
        to tarpit_s, while room is left in the tarpit) when its bucket is empty."""
        wait = self.retry_after(client)
        if wait <= 0.0:
            return
        self.throttled += 1
        hold = min(wait, self.config.tarpit_s)
        if hold > 0 and self._held < self.config.max_held:
            self._held += 1
            try:
                await asyncio.sleep(hold)
            finally:
                self._held -= 1
        raise Throttled(max(wait - hold, 0.0) or 1.0 / self.config.per_s)
