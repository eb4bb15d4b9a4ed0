"""A blocking Python client for the tandem gRPC API.

    with TandemClient("127.0.0.1:50051", api_key=key) as client:
        for chunk in client.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text_delta, end="")
        for chunk in client.chat([{"role": "user", "content": "Hi"}]):
            print(chunk.reasoning_delta, chunk.content_delta)

Streams are iterators of the generated protobuf chunks (cluster/api/gen/tandem_pb2.pyi).
Sampling parameters are keyword arguments named like the proto's SamplingParameters
fields; those not given keep the server's defaults. Failures raise grpc.RpcError (its
`code()` and `details()` say what went wrong). Leaving a stream early (break, close, an
exception) cancels the call, and the server frees the request's KV cache.

Imports only grpc and the generated modules: no torch, no engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.gen import tandem_pb2_grpc

_REASONING_EFFORTS = {
    None: pb.REASONING_EFFORT_UNSPECIFIED,
    "low": pb.REASONING_EFFORT_LOW,
    "medium": pb.REASONING_EFFORT_MEDIUM,
    "high": pb.REASONING_EFFORT_HIGH,
}


def sampling_parameters(**params: Any) -> pb.SamplingParameters:
    """SamplingParameters from keyword arguments; None means "server default"."""
    given = {k: v for k, v in params.items() if v is not None}
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    try:
        return pb.SamplingParameters(**given)
    except ValueError as err:  # protobuf's message for an unknown field name
        raise TypeError(f"unknown sampling parameter: {err}") from err


def _chat_message(m: Mapping[str, str] | pb.ChatMessage) -> pb.ChatMessage:
    if isinstance(m, pb.ChatMessage):
        return m
    return pb.ChatMessage(**m)


def _tool(t: Mapping[str, Any] | pb.Tool) -> pb.Tool:
    """A tool from {"name", "description", "parameters": JSON-schema dict}."""
    if isinstance(t, pb.Tool):
        return t
    parameters = t.get("parameters")
    return pb.Tool(
        name=t["name"],
        description=t.get("description", ""),
        parameters_json=json.dumps(parameters) if parameters is not None else "",
    )


class TandemClient:
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        *,
        root_certificates: bytes | None = None,
        tls: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """`target`: host:port. `root_certificates`: PEM CA bundle; given, the channel uses
        TLS and trusts only those CAs (use TLS whenever an API key crosses a network).
        `tls` without `root_certificates`: TLS verified against the system's CAs."""
        self.target = target
        if root_certificates is not None or tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=list(options))
        else:
            self._channel = grpc.insecure_channel(target, options=list(options))
        self._stub = tandem_pb2_grpc.TandemStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def __repr__(self) -> str:  # never shows the key
        return f"TandemClient({self.target!r}, auth={'on' if self._metadata else 'off'})"

    # ------------------------------------------------------------------- calls

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[pb.GenerateChunk]:
        """Stream a completion of `prompt` (text, or token ids). `timeout` (seconds)
        becomes the call's deadline: DEADLINE_EXCEEDED when it passes."""
        request = pb.GenerateRequest(params=sampling_parameters(**sampling), request_id=request_id)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        return self._stream(self._stub.Generate, request, timeout)

    def chat(
        self,
        messages: Sequence[Mapping[str, str] | pb.ChatMessage],
        *,
        tools: Sequence[Mapping[str, Any] | pb.Tool] = (),
        reasoning_effort: str | None = None,
        instructions: str = "",
        request_id: str = "",
        timeout: float | None = None,
        **sampling: Any,
    ) -> Iterator[pb.ChatChunk]:
        """Stream the assistant's next turn. `messages`: dicts with role, content and
        optionally channel, recipient, name. `tools`: dicts with name, description,
        parameters (a JSON-schema dict). `reasoning_effort`: low | medium | high."""
        if reasoning_effort not in _REASONING_EFFORTS:
            raise ValueError(
                f"reasoning_effort must be low, medium or high, got {reasoning_effort!r}"
            )
        request = pb.ChatRequest(
            messages=[_chat_message(m) for m in messages],
            tools=[_tool(t) for t in tools],
            reasoning_effort=_REASONING_EFFORTS[reasoning_effort],
            instructions=instructions,
            params=sampling_parameters(**sampling),
            request_id=request_id,
        )
        return self._stream(self._stub.Chat, request, timeout)

    def health(self, timeout: float | None = 10.0) -> pb.HealthResponse:
        return self._stub.Health(pb.HealthRequest(), timeout=timeout, metadata=self._metadata)

    def list_models(self, timeout: float | None = 10.0) -> list[pb.ModelInfo]:
        response = self._stub.ListModels(
            pb.ListModelsRequest(), timeout=timeout, metadata=self._metadata
        )
        return list(response.models)

    def _stream(self, method, request, timeout: float | None) -> Iterator:
        call = method(request, timeout=timeout, metadata=self._metadata)

        def chunks() -> Iterator:
            try:
                yield from call
            finally:
                # A no-op after the last chunk; otherwise tells the server to stop.
                call.cancel()

        return chunks()
