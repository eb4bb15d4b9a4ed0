"""The gRPC server: service tandem.v1.Tandem over a GenerationBackend (grpc.aio).

    request ─> ApiKeyInterceptor ─> TandemServicer ─> convert (validate, tokenize)
                                         │
                                         └─> backend.generate ─> chunks ─> context.write

Streaming handlers write with `context.write` from one coroutine instead of being async
generators: a client cancel or the deadline then lands as an exception inside our own
frames, and `aclosing` closes the backend stream right there (which aborts the request
and frees its KV blocks). An async-generator handler left suspended at `yield` would be
closed only whenever it is garbage-collected.

Status codes: INVALID_ARGUMENT names the field in the message and in the trailing
metadata key `tandem-field`; RESOURCE_EXHAUSTED when the backend's queue is full;
DEADLINE_EXCEEDED at the call's deadline; UNAVAILABLE when the backend is down or the
server drains; UNAUTHENTICATED without the configured API key (health checks excepted,
for probes).

Beside tandem.v1.Tandem the server answers the standard grpc.health.v1 service (health.py)
and server reflection. Its port is its own: bound without SO_REUSEPORT, so a second server
on a taken port fails to start (PortInUse) instead of silently sharing the traffic.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.cluster.api import DEFAULT_GRPC_PORT, convert
from tandem.cluster.api.backend import (
    BackendUnavailable,
    GenerationBackend,
    GenerationDelta,
    GenerationRequest,
    InvalidRequestError,
    QueueFull,
)
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.gen import tandem_pb2_grpc
from tandem.cluster.api.health import HEALTH_SERVICE_NAME, ServerHealth
from tandem.cluster.api.limits import DEFAULT_LIMITS, RequestLimits
from tandem.cluster.api.proto_scan import first_over_limit
from tandem.cluster.api.refusals import RefusalBudget, RefusalBudgetConfig, Throttled
from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError
from tandem.workers.text.harmony import render_conversation

log = logging.getLogger(__name__)

SERVICE_NAME = "tandem.v1.Tandem"
# Methods callable without the API key: liveness/readiness probes carry no secrets.
UNAUTHENTICATED_METHODS = frozenset(
    {
        f"/{SERVICE_NAME}/Health",
        f"/{HEALTH_SERVICE_NAME}/Check",
        f"/{HEALTH_SERVICE_NAME}/Watch",
    }
)
FIELD_METADATA_KEY = "tandem-field"


class DeadlineExceeded(Exception):
    """The call's deadline passed while its stream was running."""


class PortInUse(OSError):
    """Another process (or server) holds the address: ours bind exclusively."""


Chunk = TypeVar("Chunk", pb.GenerateChunk, pb.ChatChunk)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    # Address to bind; "0.0.0.0" or "[::]" to accept remote clients.
    port: int = DEFAULT_GRPC_PORT
    # 0 picks a free port (see TandemServer.port).
    api_key: str | None = field(default=None, repr=False)
    # When set, every method but Health needs "authorization: Bearer <key>". Kept out
    # of repr so it never reaches a log line.
    health_timeout_s: float = 5.0
    # Health answers NOT_SERVING when the backend's check takes longer than this.
    limits: RequestLimits = DEFAULT_LIMITS
    # Bounds on one request (limits.py). Requests over limits.max_request_bytes are
    # refused with INVALID_ARGUMENT before parsing; the transport drops those over twice
    # that before reading them.
    tls_cert_file: Path | None = None
    # PEM certificate chain; with tls_key_file, the server speaks TLS only.
    tls_key_file: Path | None = None
    # PEM private key of tls_cert_file.
    health_port: int | None = None
    # A second, plaintext listener on `host` that serves only grpc.health.v1, for probes
    # that speak no TLS (kubelet's `grpc:` probes); None: no such listener. 0 picks one.
    shared_port: bool = False
    # Share the port with other servers (SO_REUSEPORT), for several Ingress replicas on
    # one machine (a one-host test cluster). Off by default: a sharing listener lets any
    # process of the same user bind the port too and take a share of the traffic.
    refusals: RefusalBudgetConfig | None = RefusalBudgetConfig()
    # Refusals for bad input a connection may receive before its calls are answered
    # RESOURCE_EXHAUSTED unparsed (refusals.py); None: no budget.

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("ServerConfig.host must be non-empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            # Keys travel in a header: surrounding whitespace would never match.
            raise ValueError("ServerConfig.api_key must be non-empty without surrounding spaces")
        if not (math.isfinite(self.health_timeout_s) and self.health_timeout_s > 0):
            raise ValueError(
                f"ServerConfig.health_timeout_s must be positive, got {self.health_timeout_s}"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("ServerConfig.tls_cert_file and tls_key_file go together")
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(
                f"ServerConfig.health_port must be in [0, 65535], got {self.health_port}"
            )
        if self.health_port is not None and self.health_port == self.port != 0:
            raise ValueError("ServerConfig.health_port must differ from port")


# ------------------------------------------------------------------------------ auth


def bearer_token_matches(metadata: grpc.aio.Metadata | None, api_key: str) -> bool:
    """Whether the call's `authorization` header is "Bearer <api_key>" (constant time)."""
    value: str | bytes | None = None
    for key, v in metadata or ():
        if key.lower() == "authorization":
            value = v
            break
    if value is None:
        return False
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    scheme, _, token = raw.partition(b" ")
    # Compare even when the scheme is wrong, so timing says nothing about the token.
    token_ok = hmac.compare_digest(token.strip(), api_key.encode("utf-8"))
    return scheme.lower() == b"bearer" and token_ok


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every method except UNAUTHENTICATED_METHODS without the API key."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in UNAUTHENTICATED_METHODS:
            return handler
        if bearer_token_matches(handler_call_details.invocation_metadata, self._api_key):
            return handler
        return _refusing_handler(handler)


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)


# --------------------------------------------------------------------------- service


class TandemServicer(tandem_pb2_grpc.TandemServicer):
    def __init__(
        self, backend: GenerationBackend, config: ServerConfig, health: ServerHealth
    ) -> None:
        self.backend = backend
        self.config = config
        self.health = health
        self._text_limit = convert.max_prompt_bytes(backend.tokenizer, backend.models[0])
        self.refusals = RefusalBudget(config.refusals) if config.refusals is not None else None

    async def Generate(  # noqa: N802 - gRPC method names are CamelCase
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def body() -> None:
            model = self.backend.models[0]
            # Tokenizing releases the GIL: a long prompt does not stall other streams.
            prompt = await asyncio.to_thread(
                convert.prompt_token_ids,
                request,
                self.backend.tokenizer,
                model,
                self._text_limit,
                self.config.limits,
            )
            params = convert.sampling_params(request.params)
            gen = self._request(request.request_id, prompt, params, context)
            await self._stream(gen, convert.generate_chunk, context)

        await self._answer(body, context)

    async def Chat(  # noqa: N802
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def body() -> None:
            tokenizer = self.backend.tokenizer
            conv = convert.conversation(request, self._text_limit, self.config.limits)
            # Parameters before rendering: a refused request costs no render.
            params = convert.chat_sampling_params(request.params, tokenizer)
            prompt = await asyncio.to_thread(render_conversation, conv, tokenizer)
            gen = self._request(request.request_id, prompt, params, context)
            splitter = convert.ChatStreamSplitter(tokenizer)
            await self._stream(gen, splitter.chunk, context)

        await self._answer(body, context)

    async def Health(  # noqa: N802
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        status = await self.health.check()
        if not status.serving:
            return _not_serving(status.detail)
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    async def ListModels(  # noqa: N802
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[convert.model_info(m) for m in self.backend.models])

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _request(
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        context: grpc.aio.ServicerContext,
    ) -> GenerationRequest:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + max(0.0, remaining)
        return GenerationRequest(
            request_id=convert.request_id(rid),
            prompt_token_ids=tuple(prompt),
            params=params,
            deadline=deadline,
        )

    async def _stream(
        self,
        request: GenerationRequest,
        to_chunk: Callable[[GenerationDelta], Chunk],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Run the request on the backend and write one chunk per delta, until the last
        delta or the deadline (DeadlineExceeded). Leaving this function by any path closes
        the backend stream, which aborts the request there."""
        loop = asyncio.get_running_loop()
        when = None
        if request.deadline is not None:
            when = loop.time() + (request.deadline - time.monotonic())
        stream: AsyncGenerator[GenerationDelta, None] = self.backend.generate(request)
        timeout = asyncio.timeout_at(when)
        try:
            async with timeout, aclosing(stream):
                async for delta in stream:
                    await context.write(to_chunk(delta))
                    if delta.output.finished:
                        return
        except TimeoutError:
            if timeout.expired():
                raise DeadlineExceeded from None
            raise

    async def _answer(
        self, body: Callable[[], Awaitable[None]], context: grpc.aio.ServicerContext
    ) -> None:
        """Run a streaming handler body, turning our exceptions into status codes."""
        if self.health.draining:
            # Scale-down: admitted streams finish, new ones go to another replica.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is draining")
        try:
            await body()
        except (SamplingParamsError, InvalidRequestError) as err:
            if self.refusals is not None:
                self.refusals.charge(context.peer())
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                _field_message(err.field, str(err)),
                trailing_metadata=((FIELD_METADATA_KEY, err.field),),
            )
        except QueueFull as err:
            retry = () if err.retry_after_s is None else (("retry-after", str(err.retry_after_s)),)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(err), trailing_metadata=retry
            )
        except BackendUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))
        except DeadlineExceeded:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes were refused unparsed (the handler refuses it)."""

    error: str
    field: str = "request"


# Requests smaller than this parse in a few ms whatever they hold; larger ones have their
# repeated fields counted on the wire first (proto_scan.py).
SCAN_FROM_BYTES = 64 * 1024


def _lenient(
    parse: Callable[[bytes], object],
    limits: RequestLimits,
    counted: Mapping[int, tuple[str, int]] = {},  # noqa: B006 - read only
) -> Callable[[bytes], object]:
    """A request parser that returns MalformedRequest instead of raising (grpc would
    answer a parse error with UNKNOWN and the exception text), and that refuses requests
    over limits.max_request_bytes, or with more top-level records of a `counted` field
    (number -> (name, most records)) than allowed, before spending any time parsing them."""
    most = {number: limit for number, (_, limit) in counted.items()}

    def deserialize(data: bytes) -> object:
        if len(data) > limits.max_request_bytes:
            return MalformedRequest(
                f"request is {len(data)} bytes encoded; at most {limits.max_request_bytes}"
            )
        if most and len(data) > SCAN_FROM_BYTES:
            over = first_over_limit(data, most)
            if over is not None:
                name, limit = counted[over[0]]
                return MalformedRequest(f"{name} holds over {limit} entries; at most {limit}", name)
        try:
            return parse(data)
        except DecodeError as err:
            return MalformedRequest(f"request: not a valid protobuf message ({err})")

    return deserialize


def _guarded(
    method: Callable[..., Awaitable[object]],
    parse: Callable[[bytes], object],
    refusals: RefusalBudget | None,
) -> Callable[..., Awaitable[object]]:
    """The handler of one method: it receives the request's bytes unparsed, so a
    connection over its refusal budget is answered RESOURCE_EXHAUSTED before any parsing
    (refusals.py); then `parse` (_lenient), and bytes it refuses are INVALID_ARGUMENT."""

    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> object:
        client = context.peer()
        if refusals is not None:
            try:
                await refusals.admit(client)
            except Throttled as err:
                del data  # not held while the call is answered
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    str(err),
                    trailing_metadata=(("retry-after", f"{err.retry_after_s:.3f}"),),
                )
        request = parse(data)
        del data
        if isinstance(request, MalformedRequest):
            if refusals is not None:
                refusals.charge(client)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                request.error,
                trailing_metadata=((FIELD_METADATA_KEY, request.field),),
            )
        return await method(request, context)

    return handler


def _counted(request_cls: type, limits: RequestLimits) -> dict[int, tuple[str, int]]:
    """The repeated fields of a request counted on the wire before parsing."""
    if request_cls is not pb.ChatRequest:
        return {}
    fields = pb.ChatRequest.DESCRIPTOR.fields_by_name
    return {
        fields["messages"].number: ("messages", limits.max_messages),
        fields["tools"].number: ("tools", limits.max_tools),
    }


def _add_service(server: grpc.aio.Server, servicer: TandemServicer) -> None:
    """Register every method of the service (what the generated add_TandemServicer_to_
    server does), with request bytes that fail to parse, or are too many, answered by
    INVALID_ARGUMENT, and connections over their refusal budget by RESOURCE_EXHAUSTED."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Tandem"].methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        limits = servicer.config.limits
        # No request_deserializer: the handler gets the bytes and parses them itself,
        # after the refusal budget (_guarded).
        handlers[method.name] = make(
            _guarded(
                getattr(servicer, method.name),
                _lenient(request_cls.FromString, limits, _counted(request_cls, limits)),
                servicer.refusals,
            ),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _field_message(field_name: str, message: str) -> str:
    return message if message.startswith(field_name) else f"{field_name}: {message}"


def _not_serving(detail: str) -> pb.HealthResponse:
    return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING, detail=detail)


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when `host:port` cannot be bound now, the way the server will bind
    it (SO_REUSEADDR, no SO_REUSEPORT): `tandem serve` asks before starting Ray, so a taken
    port fails in a second with one line instead of as a replica that keeps failing."""
    bare = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise PortInUse(f"gRPC host {host!r} does not resolve: {err}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise PortInUse(
                f"gRPC port {port} on {host} is already in use ({err.strerror})"
            ) from None


def _bind(server: grpc.aio.Server, config: ServerConfig, port: int, tls: bool = True) -> int:
    """Bind `port` on the configured host (TLS when a certificate is given and `tls`);
    PortInUse when another socket holds it. grpc raises a RuntimeError naming no cause and
    logs the errno, so the message here says what is almost always the reason."""
    address = f"{config.host}:{port}"
    try:
        if tls and config.tls_cert_file is not None and config.tls_key_file is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.tls_key_file.read_bytes(), config.tls_cert_file.read_bytes())]
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUse(
            f"gRPC port {port} on {config.host} is already in use (or the address cannot be bound)"
        )
    return bound


def _exclusive_server(shared: bool = False, **kwargs: object) -> grpc.aio.Server:
    # grpc's default for grpc.so_reuseport is on: any later server on the port would share
    # it. Off unless sharing is asked for (ServerConfig.shared_port).
    options = [("grpc.so_reuseport", int(shared)), *kwargs.pop("options", ())]
    return grpc.aio.server(options=options, **kwargs)


# ----------------------------------------------------------------------------- server


class TandemServer:
    """A started grpc.aio server. Create with `await TandemServer.start(backend, config)`."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        config: ServerConfig,
        health: ServerHealth,
        health_server: grpc.aio.Server | None = None,
        health_port: int | None = None,
    ) -> None:
        self._server = server
        self._health_server = health_server
        self.port = port
        self.health_port = health_port
        # The plaintext health-only listener's port (None: none).
        self.config = config
        self.health = health

    @property
    def target(self) -> str:
        """host:port for clients on this machine."""
        host = self.config.host
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @classmethod
    async def start(cls, backend: GenerationBackend, config: ServerConfig) -> TandemServer:
        interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
        server = _exclusive_server(
            config.shared_port,
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", 2 * config.limits.max_request_bytes)],
        )
        health = ServerHealth(
            backend,
            config.health_timeout_s,
            engine_services=(SERVICE_NAME,),
            other_services=(HEALTH_SERVICE_NAME, reflection.SERVICE_NAME),
        )
        _add_service(server, TandemServicer(backend, config, health))
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = _bind(server, config, config.port)
        address = f"{config.host}:{port}"
        health_server, health_port = None, None
        if config.health_port is not None:
            # The same ServerHealth answers here: one engine check, one drain.
            health_server = _exclusive_server(options=[("grpc.max_receive_message_length", 1024)])
            health_pb2_grpc.add_HealthServicer_to_server(health.servicer, health_server)
            health_port = _bind(health_server, config, config.health_port, tls=False)
            await health_server.start()
        await server.start()
        tls = config.tls_cert_file is not None
        if config.api_key and not tls and config.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the API key travels in plaintext: serve with TLS beyond loopback")
        log.info("tandem gRPC API on %s (auth %s)", address, "on" if config.api_key else "off")
        return cls(server, port, config, health, health_server, health_port)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def drain(self) -> None:
        """Health turns NOT_SERVING (both APIs, for good) and new Generate and Chat calls
        are refused with UNAVAILABLE; streams already admitted run on."""
        await self.health.drain()

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Drain, then stop accepting calls; running streams get `grace_s` seconds to finish."""
        await self.drain()
        await self._server.stop(grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)


async def serve(backend: GenerationBackend, config: ServerConfig) -> None:
    """Serve until cancelled (the entry point of `tandem serve`'s gRPC front)."""
    server = await TandemServer.start(backend, config)
    try:
        await server.wait_for_termination()
    finally:
        await server.stop()
        await backend.close()
