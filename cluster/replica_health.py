"""The ingress's health verdicts on decode replicas, each from the caller's own timeout.

A stopped process (SIGSTOP, a hung host) answers nothing, not even "unhealthy": the only
verdict that can come is the caller's, when its timeout passes. So every check here is
a call pinned to one replica under `timeout_s`:

    replica(r)        r's engine check (DecodeServer.check_engine, pinned to r; a call
                      that lands elsewhere is refused there as PinMissed, so another
                      replica's answer never stands for r). NOT_SERVING on timeout,
                      refusal, or a failed engine.
    pool(replicas)    every listed replica at once; SERVING when at least one is
                      (the ingress can serve), never on the word of a stopped one.
                      With none listed (no registry view yet), one unpinned check.

Each call runs as a Serve request of its own (`_own_request`): calls made under one
Serve request context (an HTTP request's, through Serve's proxy) share its internal
request id, and Serve's router hands a chosen replica to the pending request with that
id; two such calls at once are mixed up, and one waits ~10 s for a routing that never
comes (observed: /health at 5 s timeouts while every replica answered in ms).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from tandem.cluster.api.backend import HealthStatus
from tandem.cluster.routing import PIN_KWARG

T = TypeVar("T")


def own_request(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """Run `coro` outside the current Serve request context: the handle calls it makes
    get request ids of their own (module docstring)."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class DecodePoolHealth:
    def __init__(self, decode: DeploymentHandle, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"DecodePoolHealth.timeout_s must be > 0, got {timeout_s}")
        self._decode = decode
        self.timeout_s = timeout_s

    async def replica(self, replica_id: str) -> HealthStatus:
        return await own_request(self._check({PIN_KWARG: replica_id}, replica_id))

    async def pool(self, replica_ids: Sequence[str]) -> HealthStatus:
        if not replica_ids:
            return await own_request(self._check({}, "(any decode replica)"))
        verdicts = await asyncio.gather(*(self.replica(r) for r in replica_ids))
        if any(v.serving for v in verdicts):
            return HealthStatus(True)
        return HealthStatus(False, "; ".join(v.detail for v in verdicts))

    async def _check(self, pin: dict[str, str], name: str) -> HealthStatus:
        response = self._decode.check_engine.remote(**pin)
        try:
            async with asyncio.timeout(self.timeout_s):
                healthy = await response
        except TimeoutError:
            response.cancel()
            return HealthStatus(
                False, f"decode replica {name} did not answer in {self.timeout_s} s"
            )
        except RayError as err:
            return HealthStatus(False, f"decode replica {name} failed its check: {_reason(err)}")
        if not healthy:
            return HealthStatus(False, f"the engine loop of decode replica {name} is stuck")
        return HealthStatus(True)


def _reason(err: RayError) -> str:
    cause = getattr(err, "cause", None)
    return type(cause if cause is not None else err).__name__
