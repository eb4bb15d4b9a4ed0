"""What the gRPC server runs requests on: the `GenerationBackend` contract and the
in-process implementation over one `AsyncLLMEngine`.

The server (server.py) does everything protocol-shaped (auth, validation, tokenizing,
harmony, deadlines, status codes) and hands a backend a `GenerationRequest` of token ids
and checked SamplingParams. A backend only runs it:

    InProcessBackend   one engine in this process (tests, `tandem serve` on one machine)
    (cluster backend)  the Ray Serve deployments: route, prefill here, decode there

Errors a backend raises, and what the client sees:

    SamplingParamsError / InvalidRequestError  -> INVALID_ARGUMENT (field named)
    QueueFull                                  -> RESOURCE_EXHAUSTED
    BackendUnavailable                         -> UNAVAILABLE
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from tandem.workers.engine.async_engine import AsyncLLMEngine, EngineDeadError
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.text.tokenizer import Tokenizer


class InvalidRequestError(ValueError):
    """A request field other than a sampling parameter is invalid; `field` names it
    (for example "prompt", "request_id", "messages[2].role")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field


class QueueFull(RuntimeError):
    """The backend admits no more requests for now; the client may retry later, after
    `retry_after_s` seconds where the backend can tell (admission control's estimate)."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(RuntimeError):
    """The backend cannot serve at all (engine failed, shut down, no replica reachable)."""


@dataclass(frozen=True)
class ModelCard:
    """One model a backend serves."""

    id: str
    # Name clients see in ListModels.
    max_model_len: int
    # Longest prompt plus completion, in tokens.
    vocab_size: int
    # Token ids must lie in [0, vocab_size).

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("ModelCard.id must be non-empty")
        if self.max_model_len < 2:
            raise ValueError(f"ModelCard.max_model_len must be >= 2, got {self.max_model_len}")
        if self.vocab_size < 1:
            raise ValueError(f"ModelCard.vocab_size must be >= 1, got {self.vocab_size}")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request in token space, as the server hands it to a backend."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    deadline: float | None = None
    # time.monotonic() by which the request must be over; None: no deadline. The server
    # enforces it by closing the stream; a backend may also use it to bound work it
    # starts elsewhere (a remote prefill, a KV transfer).


@dataclass(frozen=True)
class ServedBy:
    """Which replicas did the work; empty strings in a single process."""

    prefill_replica: str = ""
    decode_replica: str = ""


@dataclass(frozen=True)
class GenerationDelta:
    """One streamed delta: the engine's output plus what only a cluster knows."""

    output: RequestOutput
    served_by: ServedBy = field(default_factory=ServedBy)
    # Meaningful on the last delta.
    kv_transfer_s: float = 0.0
    # Seconds spent moving the prompt's KV between workers (0: none); last delta.


@dataclass(frozen=True)
class HealthStatus:
    serving: bool
    detail: str = ""
    # Why not serving.


class GenerationBackend(ABC):
    """Runs validated requests and streams their deltas.

    Contract:
    - `generate` is an async generator. Admission errors (SamplingParamsError,
      InvalidRequestError, QueueFull, BackendUnavailable) are raised before the first
      delta. The last delta has `output.finished` set; nothing follows it.
    - Leaving the iteration early (closing the iterator, or cancelling the task awaiting
      it) aborts the request wherever it runs and frees its KV blocks; the caller never
      needs a separate abort.
    - `check_health` must exercise the engine(s), not just the process: a stuck engine
      loop reports not serving. It may take up to its own timeout; the server adds one.
    - All methods are called from one asyncio event loop.
    """

    @property
    @abstractmethod
    def models(self) -> tuple[ModelCard, ...]:
        """The served models; the first is the default."""

    @property
    @abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the served model (the server tokenizes and renders harmony)."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        """Stream the request's deltas (see the class contract); an async generator, so
        the server can `aclose()` it."""

    @abstractmethod
    async def check_health(self) -> HealthStatus:
        """Whether the backend can serve now, proven by a round trip through its engine."""

    async def check_replica(self, replica_id: str) -> HealthStatus:
        """Whether one worker replica of the backend serves now (grpc.health.v1 service
        `tandem.v1.Replica/<id>`, HTTP `/health?replica=<id>`). A backend of no replicas
        knows none."""
        return HealthStatus(False, f"no replica {replica_id!r} in this backend")

    async def close(self) -> None:  # noqa: B027 - optional hook; most backends hold nothing
        """Release what the backend holds; later calls raise BackendUnavailable."""


@dataclass(frozen=True)
class InProcessBackendConfig:
    model_id: str = "tandem"
    # Name reported by ListModels.
    max_waiting_requests: int = 256
    # Requests admitted but not yet given their first token; one more is refused with
    # QueueFull (RESOURCE_EXHAUSTED) instead of queueing without bound.
    health_timeout_s: float = 5.0
    # How long a health check waits for the engine loop to pass a no-op.

    def __post_init__(self) -> None:
        if not self.model_id:
            raise ValueError("InProcessBackendConfig.model_id must be non-empty")
        if self.max_waiting_requests < 1:
            raise ValueError(
                "InProcessBackendConfig.max_waiting_requests must be >= 1, "
                f"got {self.max_waiting_requests}"
            )
        if not (math.isfinite(self.health_timeout_s) and self.health_timeout_s > 0):
            raise ValueError(
                "InProcessBackendConfig.health_timeout_s must be a positive number, "
                f"got {self.health_timeout_s}"
            )


class InProcessBackend(GenerationBackend):
    """One AsyncLLMEngine in this process.

    Admission control counts requests from admission to their first token (the queue a
    new request would wait in); past `max_waiting_requests` new ones get QueueFull. The
    count is plain int arithmetic on the event loop, so it needs no lock.
    """

    def __init__(self, engine: AsyncLLMEngine, config: InProcessBackendConfig | None = None):
        self._engine = engine
        self.config = config or InProcessBackendConfig()
        llm = engine.engine
        self._models = (
            ModelCard(
                id=self.config.model_id,
                max_model_len=llm.facts.max_model_len,
                vocab_size=llm.config.vocab_size,
            ),
        )
        self._waiting = 0
        # Ids of requests in flight here; the engine refuses a duplicate with a bare
        # ValueError, we refuse it first with one that names the field.
        self._running: set[str] = set()
        self._closed = False

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        engine_config: EngineConfig | None = None,
        config: InProcessBackendConfig | None = None,
    ) -> InProcessBackend:
        """Load the checkpoint and start its engine thread; the model id defaults to the
        directory's name."""
        engine = AsyncLLMEngine(LLMEngine.from_model_dir(model_dir, engine_config))
        return cls(engine, config or InProcessBackendConfig(model_id=Path(model_dir).name))

    @property
    def engine(self) -> AsyncLLMEngine:
        return self._engine

    @property
    def models(self) -> tuple[ModelCard, ...]:
        return self._models

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.engine.tokenizer

    @property
    def num_waiting(self) -> int:
        """Requests admitted here that have not produced a token yet."""
        return self._waiting

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        if self._closed:
            raise BackendUnavailable("the backend is shut down")
        if request.request_id in self._running:
            raise InvalidRequestError(
                "request_id", f"request_id {request.request_id!r} is already running"
            )
        if self._waiting >= self.config.max_waiting_requests:
            raise QueueFull(
                f"{self._waiting} requests are waiting for their first token "
                f"(max_waiting_requests={self.config.max_waiting_requests})"
            )
        self._waiting += 1
        self._running.add(request.request_id)
        waiting = True
        stream = self._engine.generate(request.prompt_token_ids, request.params, request.request_id)
        try:
            async with aclosing(stream):
                async for out in stream:
                    if waiting:
                        self._waiting -= 1
                        waiting = False
                    yield GenerationDelta(out)
        except EngineDeadError as err:
            raise BackendUnavailable(str(err)) from err
        finally:
            self._running.discard(request.request_id)
            if waiting:
                self._waiting -= 1

    async def check_health(self) -> HealthStatus:
        if self._closed:
            return HealthStatus(False, "the backend is shut down")
        if await self._engine.check_health(self.config.health_timeout_s):
            return HealthStatus(True)
        return HealthStatus(
            False,
            f"the engine loop did not answer within {self.config.health_timeout_s} s "
            "(stuck or failed)",
        )

    async def close(self) -> None:
        """Stop the engine thread. Stop the server first: a stream still open when the
        thread stops would wait for deltas that never come."""
        self._closed = True
        await asyncio.to_thread(self._engine.shutdown)
