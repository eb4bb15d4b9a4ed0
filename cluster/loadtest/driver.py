"""Drives a server's API (gRPC or HTTP, transport.py) with a workload and records every
request's timeline.

    open loop    each request starts at its arrival time (arrivals.py, or the trace's own
                 time), whether or not earlier ones have finished: the server sees the
                 offered load, not the load a slow server lets a closed loop offer
    concurrency  N workers, each starting its next request when the previous ends
    chat         N conversations, each turn waiting for the previous answer plus a think
                 time (workloads.ChatSessions)

Every run is bounded: `max_requests`, `duration_s` (no request starts later), a per-request
`timeout_s` (the gRPC deadline), and `max_in_flight` (an arrival finding that many requests
open is not sent and is recorded as CLIENT_OVERLOAD, so client memory stays bounded and
the report shows it). The run then waits for the requests in flight, up to their deadlines.

A request's record holds its send time, the time of each chunk with tokens (inter-token
latencies split a chunk's gap evenly over its tokens), the usage the server reported
(prompt and cached tokens), and the status code it ended with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tandem.cluster.loadtest.transport import GrpcTransport, RequestFailed, Transport
from tandem.cluster.loadtest.workloads import ChatSessions, LoadRequest


@dataclass
class RequestRecord:
    index: int
    group: str
    sent_s: float
    prompt_tokens: int
    max_tokens: int
    status: str = "OK"
    error: str = ""
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    # Seconds between consecutive tokens after the first.
    itl_s: list[float] = field(default_factory=list)
    # The server's retry-after on a RESOURCE_EXHAUSTED refusal (None: not given).
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.end_s is None else self.end_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two)."""
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None


@dataclass(frozen=True)
class RunLimits:
    max_requests: int = 1000
    duration_s: float = 60.0
    timeout_s: float = 60.0
    max_in_flight: int = 1024

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_in_flight < 1:
            raise ValueError("max_requests and max_in_flight must be >= 1")
        for name in ("duration_s", "timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value}")


class Driver:
    """One run against `target`: a gRPC HOST:PORT, or a Transport (HttpTransport for the
    HTTP API). `api_key` goes in the authorization metadata of a gRPC target."""

    def __init__(
        self,
        target: str | Transport,
        limits: RunLimits,
        *,
        api_key: str | None = None,
        temperature: float = 0.0,
        progress: Callable[[str], None] | None = None,
        origin: float | None = None,
    ) -> None:
        """`origin`: the time.monotonic() that record times count from (runs that share
        one line up on one timeline); by default the start of the run."""
        self.transport = target if isinstance(target, Transport) else GrpcTransport(target, api_key)
        self.limits = limits
        self.temperature = temperature
        self.progress = progress
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self._origin = origin
        self._start = origin if origin is not None else time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._start

    # -------------------------------------------------------------------- one request

    async def _send(self, request: LoadRequest) -> tuple[RequestRecord, list[int]]:
        record = RequestRecord(
            len(self.records), request.group, self.now(), len(request.prompt_ids),
            request.max_tokens,
        )
        self.records.append(record)
        generated: list[int] = []
        self.in_flight += 1
        last = None
        try:
            async for chunk in self.transport.generate(
                request.prompt_ids, request.max_tokens, self.temperature, self.limits.timeout_s
            ):
                if chunk.tokens:
                    t = self.now()
                    if last is None:
                        record.first_token_s = t
                        gaps = chunk.tokens - 1
                    else:
                        gaps = chunk.tokens
                    if gaps and last is not None:
                        record.itl_s += [(t - last) / gaps] * gaps
                    elif gaps:  # several tokens in the first chunk: no measurable gap
                        record.itl_s += [0.0] * gaps
                    last = t
                    record.output_tokens += chunk.tokens
                    generated += chunk.token_ids
                if chunk.cached_tokens is not None:
                    record.cached_tokens = chunk.cached_tokens
        except RequestFailed as err:
            record.status, record.error = err.status, err.details
            record.retry_after_s = err.retry_after_s
        finally:
            self.in_flight -= 1
            record.end_s = self.now()
        return record, generated

    def _refuse(self, request: LoadRequest) -> None:
        record = RequestRecord(
            len(self.records), request.group, self.now(), len(request.prompt_ids),
            request.max_tokens, status="CLIENT_OVERLOAD",
            error=f"{self.limits.max_in_flight} requests already in flight",
        )
        record.end_s = record.sent_s
        self.records.append(record)

    # -------------------------------------------------------------------- the modes

    async def open_loop(self, requests: Iterator[LoadRequest], times: Iterator[float]) -> None:
        """Each request at its own `at_s` (trace) or at the next arrival time."""

        async def body() -> None:
            tasks = set()
            for request in itertools.islice(requests, self.limits.max_requests):
                at = request.at_s if request.at_s is not None else next(times, None)
                if at is None or at >= self.limits.duration_s:
                    break
                await asyncio.sleep(max(0.0, at - self.now()))
                if self.in_flight >= self.limits.max_in_flight:
                    self._refuse(request)
                    continue
                task = asyncio.create_task(self._send(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)

        await self._run(body)

    async def concurrency(self, requests: Iterator[LoadRequest], workers: int) -> None:
        """A worker whose request is refused waits the server's retry-after (1 s if it
        gives none) before its next one, as a well-behaved client does."""
        budget = itertools.count()

        async def worker() -> None:
            for request in requests:
                if next(budget) >= self.limits.max_requests or self.now() >= self.limits.duration_s:
                    return
                record, _ = await self._send(request)
                if record.status == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(record.retry_after_s or 1.0)

        async def body() -> None:
            await asyncio.gather(*(worker() for _ in range(workers)))

        await self._run(body)

    async def chat(self, sessions: ChatSessions, seed: int, max_context: int) -> None:
        """A conversation whose next turn would pass `max_context` tokens starts over.
        Needs a transport that returns the answers' token ids (gRPC)."""
        if not self.transport.gives_token_ids:
            raise ValueError(
                f"the chat workload sends each answer back as token ids, which "
                f"{type(self.transport).__name__} does not return: use the gRPC API"
            )
        budget = itertools.count()
        rng = random.Random(seed)
        system = sessions.vocab.tokens(rng, sessions.system_tokens)
        seeds = [rng.randrange(1 << 30) for _ in range(sessions.conversations)]

        async def conversation(number: int) -> None:
            crng = random.Random(seeds[number])
            prompt = system
            await asyncio.sleep(crng.uniform(0.0, sessions.think_s))  # stagger the starts
            for _ in range(sessions.turns):
                if next(budget) >= self.limits.max_requests or self.now() >= self.limits.duration_s:
                    return
                message = sessions.vocab.tokens(crng, sessions.user_tokens.sample(crng))
                max_tokens = sessions.output_lengths.sample(crng)
                prompt += message
                if len(prompt) + max_tokens > max_context:
                    prompt = system + message
                request = LoadRequest(prompt, max_tokens, f"chat{number}")
                record, answer = await self._send(request)
                if not record.ok:
                    return
                prompt += tuple(answer)
                await asyncio.sleep(crng.expovariate(1.0 / sessions.think_s))

        async def body() -> None:
            await asyncio.gather(
                *(conversation(n) for n in range(sessions.conversations))
            )

        await self._run(body)

    async def _run(self, body) -> None:
        if self._origin is None:
            self._start = time.monotonic()
        async with self.transport:
            ticker = asyncio.create_task(self._tick()) if self.progress else None
            try:
                await body()
            finally:
                if ticker is not None:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                    self.progress(self._status_line())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.progress(self._status_line())

    def _status_line(self) -> str:
        done = [r for r in self.records if r.end_s is not None]
        errors = sum(1 for r in done if not r.ok)
        ttfts = sorted(r.ttft_s for r in done[-200:] if r.ttft_s is not None)
        p50 = f"{ttfts[len(ttfts) // 2] * 1000:.0f} ms" if ttfts else "-"
        return (
            f"loadtest: t={self.now():6.1f}s sent {len(self.records)} done {len(done)} "
            f"in flight {self.in_flight} errors {errors} ttft p50 (last 200) {p50}"
        )


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
