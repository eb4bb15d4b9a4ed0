"""The OpenAI request bodies this server accepts, as pydantic models (the HTTP boundary;
what they hold is converted once, by the route modules, through cluster/api/prepare.py).

Unknown fields are refused with 400 naming them, as the config refuses typos: a client
that sets a parameter this server does not implement should hear so rather than get
defaults. Fields OpenAI defines that change nothing here (`user`, `store`, `metadata`)
are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tandem.cluster.api.backend import InvalidRequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Loose(BaseModel):
    # Parts of a request whose other keys belong to OpenAI features we leave alone.
    model_config = ConfigDict(extra="allow", frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCallIn(_Body):
    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # The assistant's reasoning handed back (gpt-oss expects it between tool calls);
    # vLLM's and others' clients spell it either way.
    reasoning: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"]


class SamplingFields(_Body):
    """The sampling parameters every route takes, named as the gRPC API names them
    (beyond OpenAI's own: top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
    stop_token_ids, include_stop_str_in_output, as vLLM accepts them too)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None
    # Ignored: no effect on what this server does.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    request_id: str = ""


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    request_id: str = ""


class ResponseTool(_Loose):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Reasoning(_Loose):
    effort: Literal["low", "medium", "high"] | None = None


class TextFormat(_Loose):
    format: ResponseFormat | None = None


class ResponsesRequest(SamplingFields):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    stream: bool = False
    max_output_tokens: int | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    text: TextFormat | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    stream_options: dict[str, Any] | None = None
    request_id: str = ""


# Given in the body by name: SamplingFields that are SamplingParams fields as they are.
PASSTHROUGH_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
)


def given_sampling(body: SamplingFields) -> dict[str, Any]:
    """The pass-through sampling parameters the client set (null: not set)."""
    return {
        name: getattr(body, name)
        for name in PASSTHROUGH_SAMPLING
        if getattr(body, name) is not None
    }


def parse_body(model: type[BaseModel], data: object) -> Any:
    """The body validated as `model`, or InvalidRequestError naming the first bad field
    by its path ("messages[1].role", "temperature")."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        path = ""
        for part in first["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif part in _BRANCH_LABELS or not str(part).isidentifier():
                continue  # pydantic's labels of union branches, not fields
            else:
                path += f".{part}" if path else str(part)
        path = path or "body"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown parameter (not supported by this server)"
        raise InvalidRequestError(path, f"{path}: {message}") from None


# pydantic's labels of union branches in an error's location (others hold "[", never
# identifiers); field names never take these spellings.
_BRANCH_LABELS = frozenset(
    {"str", "int", "float", "bool", "dict", "list", "none", "NamedToolChoice", "ContentPart"}
)
