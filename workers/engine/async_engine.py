"""The engine for asyncio callers: the step loop on its own thread.

    caller (event loop)                    engine thread
    ───────────────────                    ─────────────
    generate() ── add_request ──────────>  step() ... step()
        ^                                     │ deltas
        └──── asyncio.Queue <── call_soon_threadsafe

One lock guards the engine; `add_request` and `abort` take it between steps. Deltas go
to a per-request asyncio queue; a caller that stops iterating (cancellation, deadline)
aborts its request, which frees its KV blocks at once. `check_health()` proves the loop
is alive: it waits for a no-op to pass through the engine thread, so a stuck engine
reports unhealthy even though the process still answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from tandem.workers.engine.llm_engine import LLMEngine
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.engine.sampling_params import SamplingParams

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread failed; the message carries the cause."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pings: list[threading.Event] = []
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tandem-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        pings: list[threading.Event] = []
        try:
            while not self._stopped:
                with self._lock:
                    pings, self._pings = self._pings, []
                    if pings:  # a health check: also whether every rank still runs steps
                        self.engine.runner.check_alive()
                    # A step still in flight is drained even when every request has gone.
                    busy = self.engine.has_unfinished() or self.engine.step_in_flight
                    outputs = self.engine.step() if busy else []
                for ping in pings:
                    ping.set()
                for out in outputs:
                    self._deliver(out)
                if not outputs and not self.engine.step_in_flight:
                    self._wake.wait(timeout=0.05)
                    self._wake.clear()
        except BaseException as err:  # the engine is broken: fail every waiting caller
            self._error = err
            for request_id in list(self._queues):
                self._deliver_error(request_id, err)
            for ping in pings + self._pings:  # health checks answer False now, not at timeout
                ping.set()

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._queues.get(out.request_id)
        if entry is None:
            return
        loop, queue = entry
        loop.call_soon_threadsafe(queue.put_nowait, out)

    def _deliver_error(self, request_id: str, err: BaseException) -> None:
        entry = self._queues.get(request_id)
        if entry is not None:
            loop, queue = entry
            loop.call_soon_threadsafe(queue.put_nowait, err)

    # ------------------------------------------------------------------- callers

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; raises SamplingParamsError before anything runs when
        the request is invalid. Leaving the loop early aborts the request."""
        request_id = self.call(lambda e: e.add_request(prompt_token_ids, params, request_id))
        async for out in self.stream(request_id):
            yield out

    def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) between steps, on the caller's thread, and wake the loop.

        For requests fn admits, call it from a coroutine: their streams (see `stream`)
        are registered in the same critical section, so no delta can be missed.
        """
        if self._error is not None:
            raise EngineDeadError(f"engine failed: {self._error!r}")
        with self._lock:
            known = set(self.engine.running_ids())
            result = fn(self.engine)
            for request_id in self.engine.running_ids() - known:
                self._queues[request_id] = (asyncio.get_running_loop(), asyncio.Queue())
        self._wake.set()
        return result

    def deliver(self, out: RequestOutput) -> None:
        """Hand a delta made outside the loop (complete_remote's first token) to its stream."""
        self._deliver(out)

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The deltas of a request admitted through `call`, until it finishes; leaving
        early aborts it."""
        entry = self._queues.get(request_id)
        if entry is None:
            raise KeyError(f"no open stream for request {request_id!r}")
        queue = entry[1]
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"engine failed: {item!r}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
        self._queues.pop(request_id, None)

    async def check_health(self, timeout_s: float = 5.0) -> bool:
        """True when the engine thread completes a loop turn within the timeout and the
        runner is alive (an expert-parallel worker: every rank)."""
        if self._error is not None or not self._thread.is_alive():
            return False
        ping = threading.Event()
        self._pings.append(ping)
        self._wake.set()
        answered = await asyncio.to_thread(ping.wait, timeout_s)
        return answered and self._error is None

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return self.engine.metrics()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the loop; streams still open end with EngineDeadError instead of waiting."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.engine.runner.close()  # expert-parallel ranks stop with the engine
        if self._error is None:
            self._error = RuntimeError("engine shut down")
        for request_id in list(self._queues):
            self._deliver_error(request_id, self._error)
