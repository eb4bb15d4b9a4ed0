"""The GenerationBackend of an Ingress replica: place each request, then stream it from the
chosen decode replica, which pulls the prompt's KV from the chosen prefill replica.

    TandemServicer ──> ClusterBackend.generate(request)
                          │ admission (queue bound, duplicate ids, context length)
                          │ IngressPlacement.place (cluster/placement.py) -> decode d,
                          │       prefill p | None, from the registry's records (polled),
                          │       in-flight figures and the prefix index (fed from the
                          │       workers' KV event streams, cluster/index_feeder.py)
                          └─> DecodeServer.generate(json, prefill_replica=p, tandem_replica=d)
                                 pinned to d by cluster/routing.py; JSON deltas back

The registry and the KV event streams are read by background tasks, never on the
request path. While Redis is unreachable the last views stay (degraded placement); with
no view at all, placement names no replica and the request router chooses (still
correct, only not load-aware).

A placement is advisory: the decode replica reports who served the request, and when it
differs from the chosen one (the chosen replica died or was scaled down between the
registry read and the call) the fallback is counted.

Stream migration (RELIABILITY.md targets 1 and 19). When the decode replica fails a
stream (its actor dies, its engine fails, the stream ends without its last delta) or
stalls (no delta for `stall_timeout_s` *and* no answer to an engine ping within
`stall_ping_timeout_s`, so a slow step never counts), the request is placed again,
without that replica, and sent as the prompt plus every token already streamed
(GenerateMessage.output_token_ids): the new engine resumes exactly where the stream
stopped (LLMEngine.add_request), so the client sees no token twice and none lost, and
greedy or seeded output is the undisturbed one. Each attempt runs under its own request
id (the old replica, if only stopped, may come back with the old one). A request moves
at most `max_migrations` times, then ends UNAVAILABLE. A replica seen failing is left
out of placement until the registry shows a heartbeat written after the failure.

    attempt 0: decode d0 ── tokens t1..tk ──X (died / stalled)
    attempt 1: decode d1 (d0 excluded) <── prompt + t1..tk ── tokens tk+1.. ── last delta
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace

from ray.exceptions import RayActorError, RayError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from tandem.cluster.admission import AdmissionConfig, AdmissionControl, Overloaded
from tandem.cluster.api.backend import (
    BackendUnavailable,
    GenerationBackend,
    GenerationDelta,
    GenerationRequest,
    HealthStatus,
    InvalidRequestError,
    ModelCard,
    QueueFull,
    ServedBy,
)
from tandem.cluster.config import DECODE, PREFILL, TandemSettings
from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.metrics import IngressMetrics
from tandem.cluster.peer_probe import ServeActorLiveness
from tandem.cluster.placement import IngressPlacement, PlacementConfig
from tandem.cluster.replica_health import DecodePoolHealth
from tandem.cluster.routing import PIN_KWARG
from tandem.router.load import LoadView
from tandem.router.policies import DisaggRule, Placement, make_policy
from tandem.workers.control_plane import (
    ControlPlaneUnavailable,
    KVEventReader,
    WorkerInfo,
    WorkerRegistry,
)
from tandem.workers.disagg.roles import GenerateMessage, ServedInfo, decode_delta
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.engine.sampling_params import SamplingParamsError
from tandem.workers.model.config import GptOssConfig
from tandem.workers.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterBackendConfig:
    max_waiting_requests: int = 256
    # Requests admitted here without a first token yet; one more is QueueFull.
    registry_poll_s: float = 0.5
    # How often the registry is re-read into the load view.
    health_timeout_s: float = 5.0
    # How long a health check waits for a decode engine's answer.
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    # The bound on the estimated wait for a first token (tandem.cluster.admission).
    max_migrations: int = 2
    # Times one request may move to another decode replica after its replica failed or
    # stalled; the failure after that ends it UNAVAILABLE. 0: never migrate.
    stall_timeout_s: float = 10.0
    # A stream with no delta for this long has its decode replica pinged ...
    stall_ping_timeout_s: float = 2.0
    # ... and is migrated when the ping gets no answer within this; a replica that
    # answers is only slow, and the stream waits another stall_timeout_s.

    def __post_init__(self) -> None:
        if self.max_waiting_requests < 1:
            raise ValueError(
                "ClusterBackendConfig.max_waiting_requests must be >= 1, "
                f"got {self.max_waiting_requests}"
            )
        if self.max_migrations < 0:
            raise ValueError(
                f"ClusterBackendConfig.max_migrations must be >= 0, got {self.max_migrations}"
            )
        for name in (
            "registry_poll_s",
            "health_timeout_s",
            "stall_timeout_s",
            "stall_ping_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"ClusterBackendConfig.{name} must be > 0, got {getattr(self, name)}"
                )


def cluster_delta(out: RequestOutput, info: ServedInfo | None) -> GenerationDelta:
    """A decode worker's delta as the API reports it.

    On the last delta (the only one with `info`): the prefill replica is named only when
    the prompt's KV really came from it, not after a fallback to local prefill; and then
    the prompt was computed there, so its cached tokens are the ones that worker found in
    its own prefix cache (the decode engine's count covers only what it kept locally).
    """
    if info is None:
        return GenerationDelta(out)
    if info.prefill_mode != "remote":
        return GenerationDelta(out, ServedBy(decode_replica=info.decode_replica))
    usage = replace(out.usage, cached_tokens=info.prefill_cached_tokens)
    return GenerationDelta(
        replace(out, usage=usage),
        ServedBy(prefill_replica=info.prefill_replica, decode_replica=info.decode_replica),
        info.kv_transfer_s,
    )


class ClusterBackend(GenerationBackend):
    """Runs requests on the Serve deployments. Call `start()` on the event loop that will
    call it (the registry poller runs there) before serving."""

    def __init__(
        self,
        *,
        model: ModelCard,
        tokenizer: Tokenizer,
        decode: DeploymentHandle,
        registry: WorkerRegistry,
        placement: IngressPlacement,
        config: ClusterBackendConfig,
        metrics: IngressMetrics | None = None,
    ) -> None:
        self._models = (model,)
        self._tokenizer = tokenizer
        self._decode = decode
        self._health = DecodePoolHealth(decode, config.health_timeout_s)
        self._registry = registry
        self.placement = placement
        self.config = config
        self._metrics = metrics
        self._workers: list[WorkerInfo] = []
        self._waiting = 0
        self.admission = AdmissionControl(config.admission)
        self._running: set[str] = set()
        # Decode replicas seen failing a stream, left out of placement until the registry
        # shows them heartbeating after the failure (_Failure).
        self._failed: dict[str, _Failure] = {}
        self.migrations: Counter[str] = Counter()
        # Streams moved to another replica, by reason (died, failed, ended, stalled).
        self.stall_pings = 0
        # Engine pings sent to decode replicas of streams that went quiet.
        self._poller: asyncio.Task | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        settings: TandemSettings,
        *,
        model: ModelCard,
        model_config: GptOssConfig,
        tokenizer: Tokenizer,
        decode: DeploymentHandle,
        metrics: IngressMetrics | None = None,
    ) -> ClusterBackend:
        """The backend of an Ingress replica, as the settings describe it."""
        url = settings.resolve_redis_url()
        cp = settings.control_plane
        p = settings.placement
        windows = [g.sliding_window for g in model_config.kv_groups if g.sliding_window]
        placement = IngressPlacement(
            decode_policy=make_policy(p.decode, p.decode_prefix_aware),
            prefill_policy=make_policy(p.prefill, p.prefill_prefix_aware),
            config=PlacementConfig(
                rule=DisaggRule(
                    settings.disagg.local_prefill_threshold, p.skip_prefill_cached_fraction
                ),
                block_size=settings.decode_engine.block_size,
                sliding_window=max(windows) if windows else None,
            ),
            index=PrefixIndexFeeder(KVEventReader(url, cluster=settings.cluster_name)),
            metrics=metrics.router if metrics is not None else None,
        )
        return cls(
            model=model,
            tokenizer=tokenizer,
            decode=decode,
            registry=WorkerRegistry(
                url,
                ttl_s=cp.heartbeat_ttl_s,
                cluster=settings.cluster_name,
                # a stopped worker leaves placement when its heartbeat stands still
                stale_after_s=cp.stale_after_s,
                # a dead one at the next poll: Ray knows (cluster/peer_probe.py)
                alive=ServeActorLiveness(
                    decode.app_name, {"prefill": PREFILL, "decode": DECODE}
                ),
            ),
            placement=placement,
            config=ClusterBackendConfig(
                max_waiting_requests=settings.max_waiting_requests,
                registry_poll_s=cp.registry_poll_s,
                health_timeout_s=settings.health_timeout_s,
                admission=AdmissionConfig(
                    max_start_delay_s=settings.max_start_delay_s,
                    initial_limit_tokens=settings.admission_initial_limit_tokens,
                    min_limit_tokens=min(256, settings.admission_initial_limit_tokens),
                ),
                max_migrations=settings.max_migrations,
                stall_timeout_s=settings.stall_timeout_s,
                stall_ping_timeout_s=settings.stall_ping_timeout_s,
            ),
            metrics=metrics,
        )

    async def start(self) -> None:
        """Read the registry and catch up with the KV event streams, then keep following
        both on this event loop."""
        await self.refresh()
        await self.placement.start()
        self._poller = asyncio.create_task(self._poll(), name="tandem-registry-poll")

    # ------------------------------------------------------------------ properties

    @property
    def models(self) -> tuple[ModelCard, ...]:
        return self._models

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def _model_workers(self) -> list[WorkerInfo]:
        """Workers serving this model, less those seen failing and not heard from since."""
        model = self._models[0].id
        return [w for w in self._workers if w.model == model and not self._failed_since(w)]

    def _failed_since(self, worker: WorkerInfo) -> bool:
        failure = self._failed.get(worker.replica_id)
        return failure is not None and not failure.heard_from_since

    def _suspect(self, replica: str | None) -> None:
        """Leave `replica` out of placement until it heartbeats again (_Failure)."""
        if replica is not None:
            known = [w.load.updated_at for w in self._workers if w.replica_id == replica]
            self._failed[replica] = _Failure(known[0] if known else float("-inf"))

    def load_view(self) -> LoadView:
        """The view the next placement decides from: workers serving this model only."""
        return self.placement.load_view(self._model_workers())

    def place(self, prompt_token_ids: Sequence[int], *, dry_run: bool = False) -> Placement:
        """Where a request with this prompt goes now (IngressPlacement.place)."""
        return self.placement.place(prompt_token_ids, self._model_workers(), dry_run=dry_run)

    def router_state(self) -> dict:
        """What this replica's placement is built on, and what it decided so far (JSON)."""
        return {
            "workers": [w.replica_id for w in self._workers],
            "excluded": sorted(w.replica_id for w in self._workers if self._failed_since(w)),
            "migrations": dict(self.migrations),
            "stall_pings": self.stall_pings,
            # What this ingress counts as under way: all zero once every request ended.
            "in_flight": self.placement.in_flight.counts(),
            "in_flight_prompt_tokens": self.placement.in_flight.prompt_tokens(),
            "waiting": self._waiting,
            "running": len(self._running),
            **self.placement.state(),
        }

    # ------------------------------------------------------------------ registry

    async def refresh(self) -> None:
        """Re-read the registry now; keeps the previous view while Redis is down."""
        try:
            self._workers = await asyncio.to_thread(self._registry.live_workers)
        except ControlPlaneUnavailable as err:
            log.warning("registry unreachable, placing on the last known view: %s", err)
        else:
            # Forget failures of replicas that left the registry or were heard from since.
            listed = {w.replica_id: w for w in self._workers}
            for replica, failure in list(self._failed.items()):
                if replica in listed:
                    failure.saw(listed[replica].load.updated_at)
                if replica not in listed or failure.heard_from_since:
                    del self._failed[replica]
        self.placement.report_index_size()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry_poll_s)
            await self.refresh()

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        if self._closed:
            raise BackendUnavailable("the backend is shut down")
        self._admit(request)
        prompt = request.prompt_token_ids
        streamed: list[int] = []
        # Usage as the first replica to stream reported it: a resumed request's prompt is
        # prefilled again, but the client's usage stays that of the undisturbed run.
        origin_cached: list[int] = []
        with _Tracked(self, request.request_id, len(prompt)) as tracked:
            for attempt in range(self.config.max_migrations + 1):
                placement = self.place((*prompt, *streamed))
                if streamed:
                    # A prefill worker computes prompts only: the decode replica prefills
                    # the prompt and the streamed tokens itself.
                    self.placement.release(placement)
                    placement = replace(placement, prefill=None)
                request_id = (
                    request.request_id if attempt == 0 else f"{request.request_id}~m{attempt}"
                )
                message = GenerateMessage(request_id, prompt, request.params, tuple(streamed))
                run = self._attempt(message, placement, tracked, request.request_id)
                try:
                    async with aclosing(run):
                        async for delta in run:
                            out = delta.output
                            if not origin_cached:
                                origin_cached.append(out.usage.cached_tokens)
                            if attempt:
                                usage = replace(out.usage, cached_tokens=origin_cached[0])
                                delta = replace(delta, output=replace(out, usage=usage))
                            streamed.extend(out.token_ids)
                            yield delta
                    return
                except _ReplicaFailed as failure:
                    self._suspect(failure.replica)
                    log.warning(
                        "request %s: decode replica %s %s after %d tokens (attempt %d)",
                        request.request_id,
                        failure.replica or "(unpinned)",
                        failure.reason,
                        len(streamed),
                        attempt,
                    )
                    if attempt == self.config.max_migrations:
                        raise BackendUnavailable(
                            f"decode replica {failure.replica or '(any)'} {failure.reason} "
                            f"after {len(streamed)} tokens, and the request has moved "
                            f"{attempt} times (max_migrations={self.config.max_migrations})"
                        ) from failure.__cause__
                    self.migrations[failure.reason] += 1
                    if self._metrics is not None:
                        self._metrics.migration(failure.reason)

    async def _attempt(
        self, message: GenerateMessage, placement: Placement, tracked: _Tracked, client_id: str
    ) -> AsyncGenerator[GenerationDelta, None]:
        """One decode replica's part of a request: its deltas, as the client's request.
        Raises _ReplicaFailed when the replica dies, fails or stalls mid-stream."""
        resumed = bool(message.output_token_ids)
        kwargs = {"prefill_replica": placement.prefill or ""}
        if placement.decode is not None:
            kwargs[PIN_KWARG] = placement.decode
        prompt_tokens = len(message.prompt_token_ids) + len(message.output_token_ids)
        with (
            tracked.attempt(placement, prompt_tokens) as attempt,
            _ray_errors(placement),
            _replica_failures(placement.decode),
        ):
            stream: DeploymentResponseGenerator = self._decode.options(stream=True).generate.remote(
                message.to_json(), **kwargs
            )
            pending: asyncio.Future | None = None
            try:
                while True:
                    pending = asyncio.ensure_future(stream.__anext__())
                    try:
                        text = await self._next_delta(pending, placement.decode)
                    except StopAsyncIteration:
                        raise _ReplicaFailed(
                            placement.decode, "ended", "the stream ended without its last delta"
                        ) from None
                    pending = None
                    out, info = decode_delta(text)
                    if resumed:
                        out = replace(out, request_id=client_id)
                    attempt.tokens(len(out.token_ids))
                    delta = cluster_delta(out, info)
                    if out.finished:
                        attempt.finished(info, delta.kv_transfer_s)
                        if info is not None and not resumed:
                            usage = delta.output.usage
                            self.placement.served(
                                placement,
                                usage.prompt_tokens,
                                usage.cached_tokens,
                                remote=info.prefill_mode == "remote",
                            )
                    yield delta
                    if out.finished:
                        return
            finally:
                if not attempt.is_finished:
                    # Stops the decode replica's generator (it aborts the request and
                    # frees its blocks) and, through Serve, any prefill call it made. A
                    # stopped replica gets it when it runs again.
                    stream.cancel()
                if pending is not None:
                    pending.cancel()
                    # Bounded: the read of a stopped replica need not end promptly.
                    done, _ = await asyncio.wait({pending}, timeout=1.0)
                    if done and not pending.cancelled():
                        pending.exception()  # retrieved: the stream is given up anyway

    async def _next_delta(self, pending: asyncio.Future, replica: str | None) -> str:
        """The stream's next delta. Every `stall_timeout_s` without one, the replica's
        engine is pinged; no answer within `stall_ping_timeout_s` raises _ReplicaFailed
        ("stalled"). A stream whose replica is unknown (placement chose none) waits."""
        while True:
            done, _ = await asyncio.wait({pending}, timeout=self.config.stall_timeout_s)
            if done:
                return pending.result()
            if replica is not None and not await self._answers(replica):
                raise _ReplicaFailed(
                    replica,
                    "stalled",
                    f"no delta for {self.config.stall_timeout_s} s and no answer to an "
                    f"engine ping within {self.config.stall_ping_timeout_s} s",
                )

    async def _answers(self, replica: str) -> bool:
        """Whether the decode replica's engine loop passes a no-op in time."""
        self.stall_pings += 1
        response = self._decode.check_engine.remote(**{PIN_KWARG: replica})
        try:
            async with asyncio.timeout(self.config.stall_ping_timeout_s):
                return bool(await response)
        except TimeoutError:
            response.cancel()
            return False
        except RayError:
            return False

    def _admit(self, request: GenerationRequest) -> None:
        """Refuse now what a worker would refuse later (errors name the field)."""
        if request.request_id in self._running:
            raise InvalidRequestError(
                "request_id", f"request_id {request.request_id!r} is already running"
            )
        model = self._models[0]
        request.params.check_against_model(
            len(request.prompt_token_ids), model.max_model_len, model.vocab_size
        )
        if self._waiting >= self.config.max_waiting_requests:
            if self._metrics is not None:
                self._metrics.request_done("rejected")
            raise QueueFull(
                f"{self._waiting} requests are waiting for their first token "
                f"(max_waiting_requests={self.config.max_waiting_requests})"
            )
        try:
            self.admission.admit(len(request.prompt_token_ids))
        except Overloaded as err:
            if self._metrics is not None:
                self._metrics.request_done("rejected")
            raise QueueFull(str(err), retry_after_s=err.retry_after_s) from None

    def _report_waiting(self) -> None:
        if self._metrics is not None:
            self._metrics.waiting(self._waiting)

    # ------------------------------------------------------------------ health

    async def check_health(self) -> HealthStatus:
        """SERVING when a decode replica the registry shows alive passes its engine check
        (each pinned, under health_timeout_s): never on the word of a stopped replica,
        and one stopped replica does not fail the pool (cluster/replica_health.py)."""
        if self._closed:
            return HealthStatus(False, "the backend is shut down")
        decode = [w.replica_id for w in self._model_workers() if w.serves("decode")]
        return await self._health.pool(decode)

    async def check_replica(self, replica_id: str) -> HealthStatus:
        """A decode replica's engine check, pinned, under health_timeout_s; a replica the
        registry shows stale or gone is NOT_SERVING without asking it. The ingress holds
        no prefill handle: a prefill replica is judged by its heartbeat (Serve runs its
        engine check)."""
        if self._closed:
            return HealthStatus(False, "the backend is shut down")
        worker = next((w for w in self._model_workers() if w.replica_id == replica_id), None)
        if worker is None:
            return HealthStatus(False, f"replica {replica_id!r} is not alive in the registry")
        if not worker.serves("decode"):
            return HealthStatus(True)  # a prefill replica: its heartbeat moves (fresh view)
        return await self._health.replica(replica_id)

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.placement.close()
        await asyncio.to_thread(self._registry.close)


class _Tracked:
    """The bookkeeping of one request on the ingress, from admission to its end: the
    admission queue, the running ids and the latency metrics. Each attempt on a decode
    replica (one, or more after migrations) has its own placement counts (_Attempt).
    Leaving the `with` block by any path settles every count exactly once.
    """

    def __init__(self, backend: ClusterBackend, request_id: str, prompt_tokens: int) -> None:
        self._backend = backend
        self._request_id = request_id
        self._metrics = backend._metrics
        self._started = time.monotonic()
        self._last_token_at: float | None = None
        self.is_finished = False
        self._prompt_tokens = prompt_tokens

    def __enter__(self) -> _Tracked:
        b = self._backend
        b._waiting += 1
        b.admission.started(self._prompt_tokens)
        b._running.add(self._request_id)
        b._report_waiting()
        return self

    @contextmanager
    def attempt(self, placement: Placement, prompt_tokens: int) -> Iterator[_Attempt]:
        """One decode replica's part; its placement counts end with the block."""
        attempt = _Attempt(self, placement, prompt_tokens)
        try:
            yield attempt
        finally:
            attempt.close()

    def tokens(self, count: int) -> None:
        if not count:
            return
        now = time.monotonic()
        if self._last_token_at is None:
            self._first_token_arrived()
            self._backend.admission.first_token(self._prompt_tokens, now - self._started)
            if self._metrics is not None:
                self._metrics.first_token(now - self._started)
        elif self._metrics is not None:
            self._metrics.inter_token(now - self._last_token_at, count)
        self._last_token_at = now

    def _first_token_arrived(self) -> None:
        b = self._backend
        b._waiting -= 1
        b._report_waiting()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._last_token_at is None:
            self._first_token_arrived()
            self._backend.admission.abandoned(self._prompt_tokens)
        self._backend._running.discard(self._request_id)
        if self._metrics is not None:
            self._metrics.request_done(_outcome(self.is_finished, kind))


class _Attempt:
    """The in-flight counts placement reads, for one attempt of a request.

    The prefill replica's part ends with the attempt's first token, the decode replica's
    with the attempt. The prompt tokens left to compute (a resumed attempt's include the
    tokens streamed before it) count against the replica that computes them (the prefill
    replica, or the decode replica when it prefills itself) until the first token.
    """

    def __init__(self, tracked: _Tracked, placement: Placement, prompt_tokens: int) -> None:
        self._tracked = tracked
        self._placement = placement
        placement_state = tracked._backend.placement
        self._in_flight = placement_state.in_flight
        # (replica, tokens) that computes the prompt, as placement expects it.
        self._computes = placement_state.computes(placement, prompt_tokens)
        self._first_token = False
        self.is_finished = False
        for replica in (placement.decode, placement.prefill):
            if replica is not None:
                computes = self._computes is not None and self._computes[0] == replica
                self._in_flight.start(replica, self._computes[1] if computes else 0)

    def tokens(self, count: int) -> None:
        if count and not self._first_token:
            self._prefilled()
        self._tracked.tokens(count)

    def _prefilled(self) -> None:
        self._first_token = True
        if self._computes is not None:
            self._in_flight.prefilled(*self._computes)
        if self._placement.prefill is not None:
            self._in_flight.finish(self._placement.prefill)

    def finished(self, info: ServedInfo | None, kv_transfer_s: float) -> None:
        self.is_finished = self._tracked.is_finished = True
        metrics = self._tracked._metrics
        decode = self._placement.decode
        if decode is not None and info is not None and info.decode_replica != decode:
            log.info("placed on decode replica %s, served by %s", decode, info.decode_replica)
            if metrics is not None:
                metrics.placement_fallback("decode")
        if kv_transfer_s > 0 and metrics is not None:
            metrics.kv_transfer(kv_transfer_s)

    def close(self) -> None:
        if not self._first_token:
            self._prefilled()
        if self._placement.decode is not None:
            self._in_flight.finish(self._placement.decode)
        self._tracked._backend.placement.release(self._placement)


@dataclass
class _Failure:
    """A replica seen failing, and what the registry said of it since.

    Its heartbeat time (WorkerLoad.updated_at) is on the worker's own clock, so it is
    only compared with itself: a replica is alive again once that time has advanced
    twice since the failure. Once is not enough: a heartbeat written just before the
    failure may reach this ingress's view only after it; a dead or stopped replica
    cannot write a second.
    """

    heartbeat: float
    # The newest heartbeat time seen from it (-inf: none yet).
    advances: int = 0

    def saw(self, heartbeat: float) -> None:
        if heartbeat > self.heartbeat:
            self.heartbeat = heartbeat
            self.advances += 1

    @property
    def heard_from_since(self) -> bool:
        return self.advances >= 2


class _ReplicaFailed(Exception):
    """A decode replica failed a stream in a way another replica may not: the request
    can move (ClusterBackend.generate)."""

    def __init__(self, replica: str | None, reason: str, detail: str) -> None:
        super().__init__(f"decode replica {replica or '(any)'} {reason}: {detail}")
        self.replica = replica
        self.reason = reason


def _outcome(finished: bool, error: type[BaseException] | None) -> str:
    if finished:
        return "finished"
    if error is not None and issubclass(error, GeneratorExit | asyncio.CancelledError):
        return "cancelled"
    if error is not None and issubclass(error, QueueFull):
        return "rejected"
    return "failed"


@contextmanager
def _replica_failures(replica: str | None) -> Iterator[None]:
    """Ray's exceptions that say the decode replica, not the request, failed, as
    _ReplicaFailed; the rest pass on to _ray_errors."""
    try:
        yield
    except (RayActorError, TaskCancelledError) as err:
        # The actor died or became unreachable, or Serve cancelled the call on its side
        # (the ingress cancels only streams it has stopped reading).
        raise _ReplicaFailed(replica, "died", type(err).__name__) from err
    except RayTaskError as err:
        if isinstance(err.cause, SamplingParamsError | InvalidRequestError):
            raise
        raise _ReplicaFailed(replica, "failed", repr(err.cause)) from err


@contextmanager
def _ray_errors(placement: Placement) -> Iterator[None]:
    """Ray's exceptions from the decode call as the backend contract's."""
    try:
        yield
    except BackPressureError as err:
        raise QueueFull(f"the decode pool is saturated: {err}") from None
    except (RayActorError, DeploymentUnavailableError, TaskCancelledError) as err:
        raise BackendUnavailable(
            f"decode replica {placement.decode or '(any)'} failed: {type(err).__name__}"
        ) from err
    except RayTaskError as err:
        if isinstance(err.cause, SamplingParamsError | InvalidRequestError):
            # Refused by the decode engine itself: still the client's field at fault.
            raise err.cause from None
        raise BackendUnavailable(f"the cluster failed the request: {err.cause!r}") from err
    except RayError as err:
        raise BackendUnavailable(f"the cluster failed the request: {err}") from err
