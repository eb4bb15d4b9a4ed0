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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import contextmanager
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
from tandem.cluster.config import TandemSettings
from tandem.cluster.index_feeder import PrefixIndexFeeder
from tandem.cluster.metrics import IngressMetrics
from tandem.cluster.placement import IngressPlacement, PlacementConfig
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

    def __post_init__(self) -> None:
        if self.max_waiting_requests < 1:
            raise ValueError(
                "ClusterBackendConfig.max_waiting_requests must be >= 1, "
                f"got {self.max_waiting_requests}"
            )
        for name in ("registry_poll_s", "health_timeout_s"):
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
        self._registry = registry
        self.placement = placement
        self.config = config
        self._metrics = metrics
        self._workers: list[WorkerInfo] = []
        self._waiting = 0
        self.admission = AdmissionControl(config.admission)
        self._running: set[str] = set()
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
            registry=WorkerRegistry(url, ttl_s=cp.heartbeat_ttl_s, cluster=settings.cluster_name),
            placement=placement,
            config=ClusterBackendConfig(
                max_waiting_requests=settings.max_waiting_requests,
                registry_poll_s=cp.registry_poll_s,
                health_timeout_s=settings.health_timeout_s,
                admission=AdmissionConfig(max_start_delay_s=settings.max_start_delay_s),
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
        model = self._models[0].id
        return [w for w in self._workers if w.model == model]

    def load_view(self) -> LoadView:
        """The view the next placement decides from: workers serving this model only."""
        return self.placement.load_view(self._model_workers())

    def place(self, prompt_token_ids: Sequence[int], *, dry_run: bool = False) -> Placement:
        """Where a request with this prompt goes now (IngressPlacement.place)."""
        return self.placement.place(prompt_token_ids, self._model_workers(), dry_run=dry_run)

    def router_state(self) -> dict:
        """What this replica's placement is built on, and what it decided so far (JSON)."""
        return {"workers": [w.replica_id for w in self._workers], **self.placement.state()}

    # ------------------------------------------------------------------ registry

    async def refresh(self) -> None:
        """Re-read the registry now; keeps the previous view while Redis is down."""
        try:
            self._workers = await asyncio.to_thread(self._registry.live_workers)
        except ControlPlaneUnavailable as err:
            log.warning("registry unreachable, placing on the last known view: %s", err)
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
        placement = self.place(request.prompt_token_ids)
        message = GenerateMessage(request.request_id, request.prompt_token_ids, request.params)
        kwargs = {"prefill_replica": placement.prefill or ""}
        if placement.decode is not None:
            kwargs[PIN_KWARG] = placement.decode
        with (
            _Tracked(self, request.request_id, placement, len(request.prompt_token_ids)) as tracked,
            _ray_errors(placement),
        ):
            stream: DeploymentResponseGenerator = self._decode.options(stream=True).generate.remote(
                message.to_json(), **kwargs
            )
            try:
                async for text in stream:
                    out, info = decode_delta(text)
                    tracked.tokens(len(out.token_ids))
                    delta = cluster_delta(out, info)
                    if out.finished:
                        tracked.finished(info, delta.kv_transfer_s)
                        if info is not None:
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
                raise BackendUnavailable("the decode stream ended without its last delta")
            finally:
                if not tracked.is_finished:
                    # Stops the decode replica's generator (it aborts the request and
                    # frees its blocks) and, through Serve, any prefill call it made.
                    stream.cancel()

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
        if self._closed:
            return HealthStatus(False, "the backend is shut down")
        try:
            async with asyncio.timeout(self.config.health_timeout_s):
                healthy = await self._decode.check_engine.remote()
        except TimeoutError:
            return HealthStatus(
                False, f"no decode engine answered within {self.config.health_timeout_s} s"
            )
        except RayError as err:
            return HealthStatus(False, f"decode pool unreachable: {type(err).__name__}")
        if not healthy:
            return HealthStatus(False, "a decode engine loop is stuck or failed")
        return HealthStatus(True)

    async def close(self) -> None:
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.placement.close()
        await asyncio.to_thread(self._registry.close)


class _Tracked:
    """The bookkeeping of one request on the ingress, from placement to its end: the
    in-flight counts placement reads, the admission queue, and the latency metrics.

    The prefill replica's part ends with the first token, the decode replica's with the
    stream. The prompt tokens left to compute count against the replica that computes
    them (the prefill replica, or the decode replica when it prefills itself) until the
    first token. Leaving the `with` block by any path settles every count exactly once.
    """

    def __init__(
        self, backend: ClusterBackend, request_id: str, placement: Placement, prompt_tokens: int
    ) -> None:
        self._backend = backend
        self._request_id = request_id
        self._placement = placement
        self._metrics = backend._metrics
        self._started = time.monotonic()
        self._last_token_at: float | None = None
        self.is_finished = False
        self._in_flight = backend.placement.in_flight
        # (replica, tokens) that computes the prompt, as placement expects it.
        self._computes = backend.placement.computes(placement, prompt_tokens)
        self._prompt_tokens = prompt_tokens

    def __enter__(self) -> _Tracked:
        b, p = self._backend, self._placement
        for replica in (p.decode, p.prefill):
            if replica is not None:
                computes = self._computes is not None and self._computes[0] == replica
                self._in_flight.start(replica, self._computes[1] if computes else 0)
        b._waiting += 1
        b.admission.started(self._prompt_tokens)
        b._running.add(self._request_id)
        b._report_waiting()
        return self

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

    def finished(self, info: ServedInfo | None, kv_transfer_s: float) -> None:
        self.is_finished = True
        decode = self._placement.decode
        if decode is not None and info is not None and info.decode_replica != decode:
            log.info("placed on decode replica %s, served by %s", decode, info.decode_replica)
            if self._metrics is not None:
                self._metrics.placement_fallback("decode")
        if kv_transfer_s > 0 and self._metrics is not None:
            self._metrics.kv_transfer(kv_transfer_s)

    def _first_token_arrived(self) -> None:
        b = self._backend
        b._waiting -= 1
        if self._computes is not None:
            self._in_flight.prefilled(*self._computes)
        if self._placement.prefill is not None:
            self._in_flight.finish(self._placement.prefill)
        b._report_waiting()

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self._last_token_at is None:
            self._first_token_arrived()
            self._backend.admission.abandoned(self._prompt_tokens)
        b = self._backend
        if self._placement.decode is not None:
            self._in_flight.finish(self._placement.decode)
        b._running.discard(self._request_id)
        if self._metrics is not None:
            self._metrics.request_done(_outcome(self.is_finished, kind))


def _outcome(finished: bool, error: type[BaseException] | None) -> str:
    if finished:
        return "finished"
    if error is not None and issubclass(error, GeneratorExit | asyncio.CancelledError):
        return "cancelled"
    if error is not None and issubclass(error, QueueFull):
        return "rejected"
    return "failed"


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
