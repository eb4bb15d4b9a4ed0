"""Health of one API server: the standard grpc.health.v1 service and our own Health RPC,
both answered from one engine check.

    grpc.health.v1 Check("" | "tandem.v1.Tandem") ─┐
    tandem.v1.Tandem/Health ────────────────────────┴─> ServerHealth.check()
                                                          │ one check in flight at a time,
                                                          │ shared by concurrent callers
                                                          └─> backend.check_health()
    drain() ──> every service NOT_SERVING for good; Watch streams see each change

Kubernetes' native `grpc:` probes and load balancers speak grpc.health.v1; our Health
RPC carries more (the reason when not serving). Both are unauthenticated (probes carry
no secrets), so the engine check is single-flight: a flood of probes costs one no-op
through the engine at a time, not one each.

Per service: "" (the whole server) and tandem.v1.Tandem follow the engine check; the
health and reflection services themselves answer SERVING until the server drains.
Watch streams follow the statuses the latest check (or drain) set.

`tandem.v1.Replica/<replica id>` (Check only) is one worker replica's verdict
(backend.check_replica), single-flight per replica like the server's own check, under
the same timeout: a stopped replica answers nothing, and the timeout says NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tandem.cluster.api.backend import GenerationBackend, HealthStatus

log = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPLICA_SERVICE_PREFIX = "tandem.v1.Replica/"
# grpc.health.v1 service name of one worker replica: this prefix + its replica id.
_MAX_REPLICA_ID = 256


class ServerHealth:
    """The engine check behind both health APIs, and the server's draining flag."""

    def __init__(
        self,
        backend: GenerationBackend,
        timeout_s: float,
        engine_services: Sequence[str],
        other_services: Sequence[str] = (),
    ) -> None:
        """`engine_services`: names whose status follows the engine check ("" is added);
        `other_services`: names that are SERVING until the server drains."""
        self._backend = backend
        self._timeout_s = timeout_s
        self._engine_services = ("", *engine_services)
        self._inflight: asyncio.Future[HealthStatus] | None = None
        self._replica_checks: dict[str, asyncio.Future[HealthStatus]] = {}
        self.draining = False
        self.servicer = _StandardHealth(self)
        for name in (*engine_services, *other_services):
            # The base class starts with "" SERVING; engine services are settled by the
            # first check (a probe before it sees the optimistic start, as with any server).
            self.servicer._server_status[name] = SERVING

    async def check(self) -> HealthStatus:
        """Run (or join) the engine check and publish its result to grpc.health.v1."""
        if self.draining:
            return HealthStatus(False, "the server is draining")
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._run_check())
        # shield: a caller whose deadline passes must not cancel the check others await.
        status = await asyncio.shield(self._inflight)
        for name in self._engine_services:
            await self.servicer.set(name, SERVING if status.serving else NOT_SERVING)
        return status

    async def check_replica(self, replica_id: str) -> HealthStatus:
        """One worker replica's verdict (single-flight per replica; not published to
        Watch streams)."""
        if self.draining:
            return HealthStatus(False, "the server is draining")
        inflight = self._replica_checks.get(replica_id)
        if inflight is None:
            inflight = asyncio.ensure_future(
                self._run_check(lambda: self._backend.check_replica(replica_id))
            )
            self._replica_checks[replica_id] = inflight
            inflight.add_done_callback(lambda _: self._replica_checks.pop(replica_id, None))
        return await asyncio.shield(inflight)

    async def _run_check(
        self, check: Callable[[], Awaitable[HealthStatus]] | None = None
    ) -> HealthStatus:
        check = check or self._backend.check_health
        try:
            async with asyncio.timeout(self._timeout_s):
                return await check()
        except TimeoutError:
            return HealthStatus(
                False, f"the backend's health check took longer than {self._timeout_s} s"
            )
        except Exception as err:  # a failing check is an unhealthy backend, not a crash
            log.warning("health check failed: %r", err)
            return HealthStatus(False, f"health check failed: {type(err).__name__}")

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on (the base class ignores later sets)."""
        self.draining = True
        await self.servicer.enter_graceful_shutdown()

    @property
    def engine_services(self) -> tuple[str, ...]:
        return self._engine_services


class _StandardHealth(HealthServicer):
    """grpc.health.v1.Health whose Check of an engine service runs the engine check."""

    def __init__(self, health: ServerHealth) -> None:
        super().__init__()
        self._health = health

    async def Check(  # noqa: N802 - gRPC method names are CamelCase
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service in self._health.engine_services and not self._health.draining:
            status = await self._health.check()
            return health_pb2.HealthCheckResponse(status=SERVING if status.serving else NOT_SERVING)
        replica = request.service.removeprefix(REPLICA_SERVICE_PREFIX)
        if replica != request.service and 0 < len(replica) <= _MAX_REPLICA_ID:
            status = await self._health.check_replica(replica)
            return health_pb2.HealthCheckResponse(status=SERVING if status.serving else NOT_SERVING)
        return await super().Check(request, context)
