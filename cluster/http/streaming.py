"""Running a request for the HTTP API: its deltas under a deadline, and server-sent
events. Leaving a stream early by any path (the client went away, the deadline passed, an
error) closes the backend stream, which aborts the request on every worker (the
GenerationBackend contract)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from tandem.cluster.api.backend import GenerationDelta
from tandem.cluster.http.errors import DeadlineExceeded, error_for


class until:
    """asyncio.timeout_at for a time.monotonic() deadline (None: no deadline), raising
    DeadlineExceeded when it is the deadline that ended the block."""

    def __init__(self, deadline: float | None) -> None:
        when = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            when = loop.time() + (deadline - time.monotonic())
        self._timeout = asyncio.timeout_at(when)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, kind, value, tb) -> bool | None:
        try:
            return await self._timeout.__aexit__(kind, value, tb)
        except TimeoutError:
            if self._timeout.expired():
                raise DeadlineExceeded from None
            raise


async def deltas(
    stream: AsyncGenerator[GenerationDelta, None], first: GenerationDelta, deadline: float | None
) -> AsyncIterator[GenerationDelta]:
    """The request's deltas up to the last one. Leaving early by any path (the client
    went away, the deadline passed, an error) closes the backend stream, which aborts
    the request wherever it runs."""
    async with aclosing(stream), until(deadline):
        yield first
        if first.output.finished:
            return
        async for delta in stream:
            yield delta
            if delta.output.finished:
                return


async def each(
    stream: AsyncGenerator[GenerationDelta, None],
    first: GenerationDelta,
    deadline: float | None,
    consume: Callable[[GenerationDelta], object],
) -> None:
    """Run a non-streamed request to its end, handing each delta to `consume`."""
    async with aclosing(deltas(stream, first, deadline)) as ds:
        async for delta in ds:
            consume(delta)


def sse(
    events: AsyncIterator[dict[str, Any]], done_marker: bool, named: bool = False
) -> StreamingResponse:
    """Server-sent events, one JSON object each. An error after the 200 went out is sent
    as a last event in OpenAI's error shape (the status line cannot change any more)."""

    async def body() -> AsyncIterator[bytes]:
        sequence = -1
        try:
            async for event in events:
                prefix = f"event: {event['type']}\n" if named else ""
                sequence = event.get("sequence_number", sequence)
                yield f"{prefix}data: {json.dumps(event)}\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:
            error = error_for(err).body()
            if named:
                # The Responses API's "error" event: the error's fields at the top level,
                # next in the stream's sequence.
                error = {**error["error"], "type": "error", "sequence_number": sequence + 1}
                yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()
            else:
                yield f"data: {json.dumps(error)}\n\n".encode()
            return
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        if done_marker:
            yield b"data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
