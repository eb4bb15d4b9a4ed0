"""The OpenAI-compatible HTTP API over a GenerationBackend, as a FastAPI app.

    POST /v1/chat/completions   chat.py        harmony chat, reasoning, tools
    POST /v1/responses          responses.py   the Responses API (gpt-oss reference shape)
    POST /v1/completions        completions.py raw prompt continuation
    GET  /v1/models             the backend's ModelCards
    GET  /health                200 when the backend's engines answer, else 503 (no key);
                                ?replica=<id>: that worker replica's verdict

`build_http_app(backend, config)` is mounted by the Ingress deployment (Ray Serve's HTTP
proxy routes to it) and served by uvicorn in tests. Requests are checked and converted by
the same layer as the gRPC API's (cluster/api/prepare.py, chat_stream.py), so both fronts
refuse the same things with the same field named. Errors: errors.py (OpenAI's JSON
shape; 400 naming the field, 401, 429 with Retry-After, 503, 504); running a request and
its server-sent events: streaming.py.

A deadline comes from the `X-Request-Timeout` header (seconds). A streamed answer runs
inside the response's body iterator; when the client disconnects, the server cancels
that iterator, and leaving it closes the backend stream, which aborts the request on
every worker (the GenerationBackend contract). Admission errors are raised before the
first delta, so the stream's first delta is awaited before the 200 goes out: a full
queue is a 429, not a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tandem.cluster.api import limits as input_limits
from tandem.cluster.api import prepare
from tandem.cluster.api.backend import (
    GenerationBackend,
    GenerationDelta,
    GenerationRequest,
)
from tandem.cluster.api.chat_stream import ChatSplitter
from tandem.cluster.api.refusals import RefusalBudget, RefusalBudgetConfig, Throttled
from tandem.cluster.http import chat, completions, responses
from tandem.cluster.http.errors import ApiError, bad_request, bearer_ok, error_for
from tandem.cluster.http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    parse_body,
)
from tandem.cluster.http.streaming import deltas, each, sse, until
from tandem.workers.engine.sampling_params import SamplingParams, SamplingParamsError

log = logging.getLogger(__name__)

DEADLINE_HEADER = "x-request-timeout"


@dataclass(frozen=True)
class HttpConfig:
    api_key: str | None = field(default=None, repr=False)
    # When set, every route but /health needs "Authorization: Bearer <key>". Kept out of
    # repr so it never reaches a log line.
    retry_after_s: int = 1
    # Retry-After of a 429 (queue full).
    health_timeout_s: float = 5.0
    # /health answers 503 when the backend's check takes longer.
    max_body_bytes: int = 4 * 1024 * 1024
    # Largest request body accepted (413 beyond).
    limits: input_limits.RequestLimits = input_limits.DEFAULT_LIMITS
    # The same input bounds as the gRPC API (cluster/api/limits.py): JSON depth before
    # parsing, message and tool counts before the schema builds objects for them.
    refusals: RefusalBudgetConfig | None = RefusalBudgetConfig()
    # Refusals (4xx but 429) a connection may receive before its requests are answered
    # 429 unread (cluster/api/refusals.py); None: no budget.

    def __post_init__(self) -> None:
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("HttpConfig.api_key must be non-empty without surrounding spaces")
        if self.retry_after_s < 0:
            raise ValueError(f"HttpConfig.retry_after_s must be >= 0, got {self.retry_after_s}")
        if not (math.isfinite(self.health_timeout_s) and self.health_timeout_s > 0):
            raise ValueError(
                f"HttpConfig.health_timeout_s must be positive, got {self.health_timeout_s}"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(
                f"HttpConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes}"
            )


class OpenAIFront:
    """The routes' logic over one backend (one per Ingress replica)."""

    def __init__(self, backend: GenerationBackend, config: HttpConfig) -> None:
        self.backend = backend
        self.config = config
        self._model = backend.models[0]
        self._text_limit = prepare.max_prompt_bytes(backend.tokenizer, self._model)

    # ------------------------------------------------------------- plumbing

    async def _body(self, request: Request) -> object:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.config.max_body_bytes:
            # Refused on the header, before the body is read.
            raise ApiError(
                413,
                f"body: {declared} bytes, at most {self.config.max_body_bytes}",
                "invalid_request_error",
                param="body",
            )
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise ApiError(
                413,
                f"body: {len(raw)} bytes, at most {self.config.max_body_bytes}",
                "invalid_request_error",
                param="body",
            )
        # Depth before parsing: a body nested thousands deep is a RecursionError otherwise.
        return input_limits.parse_json_body(self.config.limits, raw)

    def _check_model(self, name: str) -> str:
        ids = [m.id for m in self.backend.models]
        if name not in ids:
            raise ApiError(
                404,
                f"model: {name!r} is not served here (served: {', '.join(ids)})",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return name

    def _deadline(self, request: Request) -> float | None:
        value = request.headers.get(DEADLINE_HEADER)
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise bad_request(
                DEADLINE_HEADER, f"{DEADLINE_HEADER}: must be a positive number of seconds"
            )
        return time.monotonic() + seconds

    def _params(
        self,
        build: Callable[[], SamplingParams],
        given: dict[str, Any],
        prompt_len: int,
        name: Callable[[str], str],
    ) -> SamplingParams:
        """SamplingParams, max_tokens defaulting to what the context has left (OpenAI's
        default); a SamplingParamsError names the field as the route's client spells it."""
        given.setdefault("max_tokens", max(1, self._model.max_model_len - prompt_len))
        try:
            params = build()
            params.check_against_model(
                prompt_len, self._model.max_model_len, self._model.vocab_size
            )
        except SamplingParamsError as err:
            raise bad_request(name(err.field), _renamed(str(err), err.field, name)) from None
        return params

    async def _open(
        self, rid: str, prompt: list[int], params: SamplingParams, deadline: float | None
    ) -> tuple[AsyncGenerator[GenerationDelta, None], GenerationDelta]:
        """Start the request and wait for its first delta (admission errors raise here)."""
        request = GenerationRequest(
            request_id=prepare.request_id(rid),
            prompt_token_ids=tuple(prompt),
            params=params,
            deadline=deadline,
        )
        stream = self.backend.generate(request)
        try:
            async with until(deadline):
                first = await anext(stream)
        except BaseException:
            await stream.aclose()
            raise
        return stream, first

    # --------------------------------------------------------------- routes

    async def chat_completions(self, request: Request) -> Response:
        data = await self._body(request)
        input_limits.check_json_chat_sizes(self.config.limits, data)
        body = parse_body(ChatCompletionRequest, data)
        model = self._check_model(body.model)
        tok = self.backend.tokenizer
        prepared = chat.prepare_chat(body, tok, self._text_limit)
        prompt = await asyncio.to_thread(
            prepare.chat_prompt, prepared.conversation, tok, prepared.forced
        )
        params = self._params(
            lambda: chat.sampling_for(prepared, tok),
            prepared.sampling,
            len(prompt),
            lambda f: chat.param_name(body, f),
        )
        deadline = self._deadline(request)
        engine_id = prepare.request_id(body.request_id)
        rid = f"chatcmpl-{engine_id}"
        stream, first = await self._open(engine_id, prompt, params, deadline)
        splitter = ChatSplitter(tok, prepared.forced.header_ids if prepared.forced else ())
        want_lp = bool(body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunker = chat.ChatChunker(rid, model, tok, want_lp, include_usage)

            async def events() -> AsyncIterator[dict[str, Any]]:
                yield chunker.first()
                async with aclosing(deltas(stream, first, deadline)) as ds:
                    async for delta in ds:
                        for chunk in chunker.chunks(splitter.split(delta)):
                            yield chunk

            return sse(events(), done_marker=True)
        acc = chat.ChatAccumulator(tok, want_lp)
        await each(stream, first, deadline, lambda d: acc.add(splitter.split(d)))
        return JSONResponse(acc.completion(rid, model))

    async def completions(self, request: Request) -> Response:
        body = parse_body(CompletionRequest, await self._body(request))
        model = self._check_model(body.model)
        tok = self.backend.tokenizer
        given = completions.sampling(body)
        prompt = await asyncio.to_thread(
            completions.prompt_ids, body, tok, self._model, self._text_limit
        )
        stop = completions.stop(body)
        stop_ids = tuple(body.stop_token_ids or ())
        params = self._params(
            lambda: prepare.sampling_params(given, stop, stop_ids),
            given,
            len(prompt),
            lambda f: f,
        )
        deadline = self._deadline(request)
        engine_id = prepare.request_id(body.request_id)
        rid = f"cmpl-{engine_id}"
        stream, first = await self._open(engine_id, prompt, params, deadline)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        builder = completions.CompletionBuilder(
            rid, model, tok, body.logprobs is not None, include_usage
        )
        if body.stream:

            async def events() -> AsyncIterator[dict[str, Any]]:
                async with aclosing(deltas(stream, first, deadline)) as ds:
                    async for delta in ds:
                        for chunk in builder.chunks(delta.output):
                            yield chunk

            return sse(events(), done_marker=True)
        await each(stream, first, deadline, lambda d: builder.add(d.output))
        return JSONResponse(builder.completion())

    async def responses(self, request: Request) -> Response:
        data = await self._body(request)
        input_limits.check_json_chat_sizes(self.config.limits, data, messages_key="input")
        body = parse_body(ResponsesRequest, data)
        model = self._check_model(body.model)
        tok = self.backend.tokenizer
        conv = responses.conversation(body, self._text_limit)
        forced = responses.forced_call(body, tok)
        prompt = await asyncio.to_thread(prepare.chat_prompt, conv, tok, forced)
        given = responses.sampling(body)
        stop_ids = tuple(body.stop_token_ids or ())
        params = self._params(
            lambda: prepare.chat_sampling_params(given, tok, (), stop_ids),
            given,
            len(prompt),
            responses.param_name,
        )
        deadline = self._deadline(request)
        engine_id = prepare.request_id(body.request_id)
        stream, first = await self._open(engine_id, prompt, params, deadline)
        splitter = ChatSplitter(tok, forced.header_ids if forced else ())
        builder = responses.ResponseBuilder(body, model)
        if body.stream:

            async def events() -> AsyncIterator[dict[str, Any]]:
                for event in builder.start_events():
                    yield event
                async with aclosing(deltas(stream, first, deadline)) as ds:
                    async for delta in ds:
                        for event in builder.add(splitter.split(delta)):
                            yield event

            return sse(events(), done_marker=False, named=True)
        await each(stream, first, deadline, lambda d: builder.add(splitter.split(d)))
        return JSONResponse(builder.response())

    def models(self) -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": m.id,
                        "object": "model",
                        "created": 0,
                        "owned_by": "tandem",
                        # beyond OpenAI's fields, as vLLM's max_model_len; `tandem loadtest`
                        # draws prompt ids from the vocabulary
                        "max_model_len": m.max_model_len,
                        "vocab_size": m.vocab_size,
                    }
                    for m in self.backend.models
                ],
            }
        )

    async def health(self, replica: str | None = None) -> Response:
        """The backend's health, or with `replica` that one worker replica's."""
        timeout = self.config.health_timeout_s
        try:
            async with asyncio.timeout(timeout):
                if replica is None:
                    status = await self.backend.check_health()
                else:
                    status = await self.backend.check_replica(replica)
        except TimeoutError:
            return JSONResponse({"status": "NOT_SERVING", "detail": "health check timed out"}, 503)
        except Exception as err:  # a failing check is an unhealthy backend, not a crash
            log.warning("health check failed: %r", err)
            return JSONResponse({"status": "NOT_SERVING", "detail": type(err).__name__}, 503)
        if not status.serving:
            return JSONResponse({"status": "NOT_SERVING", "detail": status.detail}, 503)
        return JSONResponse({"status": "SERVING"})


def _renamed(message: str, field_name: str, name: Callable[[str], str]) -> str:
    new = name(field_name)
    return message if new == field_name else message.replace(field_name, new, 1)


def build_http_app(backend: GenerationBackend, config: HttpConfig) -> FastAPI:
    """The FastAPI app of one front over `backend`."""
    front = OpenAIFront(backend, config)
    refusals = RefusalBudget(config.refusals) if config.refusals is not None else None
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.front = front

    async def guarded(handler, request: Request) -> Response:
        # One budget per connection (the client's address and port), refusals.py.
        client = f"{request.client.host}:{request.client.port}" if request.client else ""
        try:
            if refusals is not None:
                await refusals.admit(client)
            if config.api_key and not bearer_ok(
                request.headers.get("authorization"), config.api_key
            ):
                raise ApiError(
                    401,
                    "missing or invalid API key",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
            return await handler(request)
        except Throttled as err:
            return ApiError(
                429,
                str(err),
                "rate_limit_error",
                code="too_many_invalid_requests",
                headers={"Retry-After": str(max(1, math.ceil(err.retry_after_s)))},
            ).response()
        except Exception as err:
            error = error_for(err, config.retry_after_s)
            if refusals is not None and 400 <= error.status < 500 and error.status != 429:
                refusals.charge(client)  # the client's fault: it costs a refusal token
            return error.response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await guarded(front.chat_completions, request)

    @app.post("/v1/completions")
    async def completions_route(request: Request) -> Response:
        return await guarded(front.completions, request)

    @app.post("/v1/responses")
    async def responses_route(request: Request) -> Response:
        return await guarded(front.responses, request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        async def answer(_: Request) -> Response:
            return front.models()

        return await guarded(answer, request)

    @app.get("/health")
    async def health(replica: str | None = None) -> Response:
        return await front.health(replica)

    return app
