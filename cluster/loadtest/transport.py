"""How the load generator reaches a server: the gRPC API or the OpenAI-compatible HTTP API.

    GrpcTransport("host:port")           Tandem.Generate, the prompt as token ids
    HttpTransport("http://host:port")    POST /v1/completions streamed (server-sent events),
                                         the prompt as token ids, `logprobs: 0` so that each
                                         event says how many tokens it carries, usage at the
                                         end (`stream_options.include_usage`)

Both stream `Chunk`s and end a failed request with `RequestFailed`, whose status is the
gRPC code name; HTTP answers are mapped to the same names (429 -> RESOURCE_EXHAUSTED with
its Retry-After, 400 -> INVALID_ARGUMENT, 503 -> UNAVAILABLE, 504 -> DEADLINE_EXCEEDED, as
the API maps them the other way), so one report covers both. HTTP does not return token
ids: the chat workload, which sends each answer back as the next prompt, needs gRPC.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc

from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.gen import tandem_pb2_grpc

# the request's deadline in seconds (tandem.cluster.http.app.DEADLINE_HEADER; not imported:
# the load generator is a client and stays clear of the server's modules)
DEADLINE_HEADER = "x-request-timeout"


@dataclass(frozen=True)
class Chunk:
    tokens: int
    # the tokens themselves where the API returns them (gRPC), else empty
    token_ids: tuple[int, ...] = ()
    # set on the chunk that carries the usage
    cached_tokens: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    id: str
    vocab_size: int
    max_model_len: int


class RequestFailed(Exception):
    def __init__(self, status: str, details: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status}: {details}")
        self.status, self.details, self.retry_after_s = status, details, retry_after_s


class Transport(ABC):
    """One connection (channel or session) for a whole run: `async with transport:`."""

    # whether chunks carry token ids (the chat workload needs them)
    gives_token_ids: bool

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self.target, self.api_key = target, api_key

    @abstractmethod
    async def __aenter__(self) -> Transport: ...

    @abstractmethod
    async def __aexit__(self, *exc: object) -> None: ...

    @abstractmethod
    async def model(self) -> ModelInfo:
        """The served model (the first one the server lists)."""

    @abstractmethod
    def generate(
        self, prompt_ids: tuple[int, ...], max_tokens: int, temperature: float, timeout_s: float
    ) -> AsyncIterator[Chunk]:
        """Stream one request; raises RequestFailed on any failure."""


class GrpcTransport(Transport):
    gives_token_ids = True

    async def __aenter__(self) -> GrpcTransport:
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._metadata = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def model(self) -> ModelInfo:
        try:
            reply = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=10, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as err:
            raise RequestFailed(err.code().name, err.details() or "") from None
        if not reply.models:
            raise RequestFailed("NOT_FOUND", f"{self.target} serves no model")
        m = reply.models[0]
        return ModelInfo(m.id, m.vocab_size, m.max_model_len)

    async def generate(
        self, prompt_ids: tuple[int, ...], max_tokens: int, temperature: float, timeout_s: float
    ) -> AsyncIterator[Chunk]:
        message = pb.GenerateRequest(
            token_ids=pb.TokenIds(ids=prompt_ids),
            params=pb.SamplingParameters(
                max_tokens=max_tokens, temperature=temperature, ignore_eos=True
            ),
        )
        try:
            call = self._stub.Generate(message, timeout=timeout_s, metadata=self._metadata)
            async for chunk in call:
                cached = chunk.usage.cached_tokens if chunk.HasField("usage") else None
                if chunk.token_ids or cached is not None:
                    yield Chunk(len(chunk.token_ids), tuple(chunk.token_ids), cached)
        except grpc.aio.AioRpcError as err:
            retry = None
            for key, value in err.trailing_metadata() or ():
                if key == "retry-after":
                    retry = float(value)
            raise RequestFailed(err.code().name, err.details() or "", retry) from None


# HTTP status -> the gRPC code name the report uses (the API's own mapping, reversed)
_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# an error event after the 200 went out, by its OpenAI error type or code
_ERROR_TYPE = {
    "invalid_request_error": "INVALID_ARGUMENT",
    "rate_limit_error": "RESOURCE_EXHAUSTED",
    "timeout": "DEADLINE_EXCEEDED",
    "unavailable": "UNAVAILABLE",
}


class HttpTransport(Transport):
    gives_token_ids = False

    def __init__(self, target: str, api_key: str | None = None, model: str = "") -> None:
        """`target`: the base URL (http://host:port); `model`: the id requests name
        (default: the first one /v1/models lists, asked once)."""
        super().__init__(target, api_key)
        self._model_id = model
        self._model_lock = asyncio.Lock()

    async def __aenter__(self) -> HttpTransport:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # no pool limit: the driver bounds requests in flight itself (max_in_flight)
        self._session = aiohttp.ClientSession(
            self.target.rstrip("/"), headers=headers, connector=aiohttp.TCPConnector(limit=0)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def model(self) -> ModelInfo:
        try:
            async with self._session.get("/v1/models", timeout=_timeout(10.0)) as response:
                if response.status != 200:
                    raise _failed(response.status, await response.text(), response.headers)
                models = (await response.json())["data"]
        except (aiohttp.ClientError, TimeoutError) as err:
            raise RequestFailed("UNAVAILABLE", f"{self.target}: {err!r}") from None
        if not models:
            raise RequestFailed("NOT_FOUND", f"{self.target} serves no model")
        m = models[0]
        if "vocab_size" not in m or "max_model_len" not in m:
            raise RequestFailed(
                "FAILED_PRECONDITION",
                f"{self.target}/v1/models gives no vocab_size and max_model_len "
                "(not a tandem server?)",
            )
        self._model_id = m["id"]
        return ModelInfo(m["id"], int(m["vocab_size"]), int(m["max_model_len"]))

    async def generate(
        self, prompt_ids: tuple[int, ...], max_tokens: int, temperature: float, timeout_s: float
    ) -> AsyncIterator[Chunk]:
        body = {
            "model": self._model_id or await self._first_model_id(),
            "prompt": list(prompt_ids),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": True,
            "logprobs": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {DEADLINE_HEADER: f"{timeout_s:g}"}
        try:
            async with self._session.post(
                "/v1/completions", json=body, headers=headers, timeout=_timeout(timeout_s)
            ) as response:
                if response.status != 200:
                    raise _failed(response.status, await response.text(), response.headers)
                async for event in _events(response):
                    if "error" in event:
                        error = event["error"] or {}
                        status = _ERROR_TYPE.get(error.get("code") or "") or _ERROR_TYPE.get(
                            error.get("type") or "", "INTERNAL"
                        )
                        raise RequestFailed(status, str(error.get("message", "")))
                    yield _chunk(event)
        except TimeoutError:
            raise RequestFailed("DEADLINE_EXCEEDED", f"no answer within {timeout_s} s") from None
        except aiohttp.ClientError as err:
            raise RequestFailed("UNAVAILABLE", repr(err)) from None

    async def _first_model_id(self) -> str:
        async with self._model_lock:
            return self._model_id or (await self.model()).id


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


def _failed(status: int, text: str, headers: Any) -> RequestFailed:
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:200]
    retry = headers.get("Retry-After")
    return RequestFailed(
        _HTTP_STATUS.get(status, f"HTTP_{status}"),
        f"HTTP {status}: {message}",
        float(retry) if retry is not None else None,
    )


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chunk(event: dict[str, Any]) -> Chunk:
    tokens = 0
    for choice in event.get("choices") or ():
        logprobs = choice.get("logprobs") or {}
        tokens += len(logprobs.get("tokens") or ())
    usage = event.get("usage")
    cached = None
    if usage:
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Chunk(tokens, (), cached)
