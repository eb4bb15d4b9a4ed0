"""Admission control at the ingress: admit a request only when the pools can start it
within a bound, otherwise refuse it at once with a time to retry after.

A request's start is its first token. The ingress knows the prompt tokens it admitted
that have no first token yet (the backlog), and it sees each request's time to first
token (TTFT). It keeps a limit on the backlog, adapted to what the pools achieve, the way
TCP's congestion window is (slow start, then additive increase, multiplicative decrease):

    admit    when backlog + the request's prompt tokens <= limit (or the backlog is
             empty: one request always gets through)
    refuse   otherwise, at once: RESOURCE_EXHAUSTED / 429, retry after about one recent
             TTFT (the time the backlog takes to turn over)
    a fast first token while the limit was nearly reached (the pools keep up: allow more):
             slow start    limit += its prompt tokens (doubles the limit per TTFT),
                           while TTFTs stay within half of max_start_delay_s
             then          limit += its prompt tokens * increase
    a first token later than max_start_delay_s (they do not keep up), for a request
             admitted after the last cut (older ones measure an older limit: reacting to
             them would cut again and again for one overshoot):
             limit = min(limit * decrease, backlog * max_start_delay_s / ttft)
             (the second term: the backlog that would have started in time at the rate
             just seen, so one slow start brings the limit near the right level)

The limit starts small (initial_limit_tokens) and slow start finds the pools' level within
a few TTFTs; a large initial limit would admit a burst that then waits for seconds (under
overload from a cold start: the first TTFT comes back only after the burst is in).
max_start_delay_s is the level the limit steers to, not a hard ceiling: admitted TTFT p99
lands at about 1.2-1.5x it (tests/test_admission.py's modelled pools; bench/RESULTS.md's
CPU cluster), so set it below the SLO by that much.
A throughput estimate from first tokens would not do: it measures only the concurrency
admitted, and batching makes throughput grow with concurrency, so an estimate that
limits concurrency ratchets itself down. The latency signal does not: the limit grows
until starts get slow, then backs off, and follows the pools as they scale. Each ingress
replica adapts to its own share of the traffic and needs nothing shared. The count
bound (`max_waiting_requests`) stays as a backstop for memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionConfig:
    max_start_delay_s: float = 2.0
    # The time to first token that admitted requests should keep.
    initial_limit_tokens: int = 4096
    # The backlog limit before anything is measured (slow start grows it from there). At
    # most what the pools start within max_start_delay_s (their prompt tokens/s times it):
    # more admits a first burst under overload that then waits (p99 ~2x the bound at 4x
    # that, tests/test_admission.py), less refuses some of a first burst on an idle
    # cluster until slow start has grown it.
    min_limit_tokens: int = 256
    # The limit never drops below this (an empty backlog always admits one request).
    increase: float = 0.25
    # Share of a fast-starting request's prompt tokens added to the limit.
    decrease: float = 0.8
    # Factor on the limit after a slow start.

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_start_delay_s) and self.max_start_delay_s > 0):
            raise ValueError(
                f"admission.max_start_delay_s must be > 0, got {self.max_start_delay_s!r}"
            )
        if not 1 <= self.min_limit_tokens <= self.initial_limit_tokens:
            raise ValueError("admission: need 1 <= min_limit_tokens <= initial_limit_tokens")
        if not 0 < self.increase <= 1 or not 0 < self.decrease < 1:
            raise ValueError("admission: increase must be in (0, 1], decrease in (0, 1)")


class Overloaded(Exception):
    """Refused at admission; `retry_after_s` whole seconds from now may succeed."""

    def __init__(self, backlog: int, limit: float, retry_after_s: int) -> None:
        super().__init__(
            f"{backlog} prompt tokens are waiting to start, the limit that keeps the time "
            f"to first token within bounds is {limit:.0f}; retry after {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class AdmissionControl:
    """Backlog and limit of one ingress. Calls: `admit(tokens)` (raises Overloaded), then
    `started(tokens)` for an admitted request, and exactly one of
    `first_token(tokens, ttft_s)` or `abandoned(tokens)` when it leaves the backlog."""

    def __init__(
        self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.backlog_tokens = 0
        self.limit_tokens = float(config.initial_limit_tokens)
        self._last_decrease = -math.inf
        self.slow_start = True
        # the recent time to first token (exponential average), for retry-after
        self.recent_ttft_s = 0.0

    def admit(self, prompt_tokens: int) -> None:
        if self.backlog_tokens and self.backlog_tokens + prompt_tokens > self.limit_tokens:
            retry = max(1, math.ceil(self.recent_ttft_s))
            raise Overloaded(self.backlog_tokens, self.limit_tokens, retry)

    def started(self, prompt_tokens: int) -> None:
        self.backlog_tokens += prompt_tokens

    def first_token(self, prompt_tokens: int, ttft_s: float) -> None:
        c = self.config
        backlog = self.backlog_tokens
        self.backlog_tokens = max(0, backlog - prompt_tokens)
        self.recent_ttft_s = 0.8 * self.recent_ttft_s + 0.2 * ttft_s if self.recent_ttft_s \
            else ttft_s
        now = self._clock()
        if ttft_s > c.max_start_delay_s:
            if now - ttft_s >= self._last_decrease:
                in_time = backlog * c.max_start_delay_s / ttft_s
                limit = min(self.limit_tokens * c.decrease, in_time)
                self.limit_tokens = max(float(c.min_limit_tokens), limit)
                self._last_decrease = now
                self.slow_start = False
        elif backlog >= 0.5 * self.limit_tokens:
            if self.slow_start and ttft_s > 0.5 * c.max_start_delay_s:
                self.slow_start = False
            self.limit_tokens += prompt_tokens * (1.0 if self.slow_start else c.increase)

    def abandoned(self, prompt_tokens: int) -> None:
        self.backlog_tokens = max(0, self.backlog_tokens - prompt_tokens)
