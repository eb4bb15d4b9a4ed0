"""Requests in, whichever front they came through: the one conversion layer that both the
gRPC API (convert.py maps protobuf onto it) and the OpenAI-compatible HTTP API
(cluster/http/) use to check a request and turn it into token ids and SamplingParams.

    gRPC  GenerateRequest / ChatRequest ──┐
                                          ├─> prepare.* ─> GenerationRequest (backend.py)
    HTTP  /v1/completions, /v1/chat/... ──┘      │
                                                 └─ harmony render, validation, limits

Every error is InvalidRequestError (or SamplingParamsError) naming the offending field;
each front spells field names its own way, so callers pass the name to use (`field=`) or
map SamplingParams' names onto theirs.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tandem.cluster.api import limits as input_limits
from tandem.cluster.api.backend import InvalidRequestError, ModelCard
from tandem.cluster.api.limits import DEFAULT_LIMITS, RequestLimits
from tandem.workers.engine.sampling_params import (
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    SamplingParamsError,
)
from tandem.workers.text.harmony import (
    REASONING_EFFORTS,
    Conversation,
    Message,
    ToolSpec,
    chat_stop_token_ids,
    render_conversation,
)
from tandem.workers.text.tokenizer import Tokenizer

MAX_REQUEST_ID_CHARS = 128
# SamplingParams fields a front may set by name (stop lists are passed apart).
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "include_stop_str_in_output",
)


def request_id(value: str) -> str:
    """The client's id after checking it, or a fresh one when empty."""
    if not value:
        return f"req-{uuid.uuid4().hex}"
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            "request_id", f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters"
        )
    if not (value.isascii() and value.isprintable()):
        raise InvalidRequestError("request_id", "request_id must be printable ASCII")
    return value


def sampling_params(
    given: Mapping[str, Any],
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    extra_stop_token_ids: Sequence[int] = (),
) -> SamplingParams:
    """SamplingParams from the fields a client set (absent keys keep the defaults);
    raises SamplingParamsError naming the field. `extra_stop_token_ids` are the front's
    own (a chat turn's <|return|> and <|call|>), added after the client's."""
    unknown = sorted(set(given) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(f"not sampling parameters: {unknown}")  # a caller's bug
    # Counted before a tuple of them is built: 100,000 stop strings are 300 KB of request.
    for name, values, limit in (
        ("stop", stop, MAX_STOP_STRINGS),
        ("stop_token_ids", stop_token_ids, MAX_STOP_TOKEN_IDS),
    ):
        if len(values) > limit:
            raise SamplingParamsError(
                name, len(values), f"{name} must hold at most {limit} entries, got {len(values)}"
            )
    params = SamplingParams(stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), **given)
    if extra_stop_token_ids:
        ids = params.stop_token_ids + tuple(
            t for t in extra_stop_token_ids if t not in params.stop_token_ids
        )
        params = replace(params, stop_token_ids=ids)
    return params


def chat_sampling_params(
    given: Mapping[str, Any],
    tokenizer: Tokenizer,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
) -> SamplingParams:
    """A chat turn also ends on <|return|> and <|call|> (never on <|end|>)."""
    return sampling_params(given, stop, stop_token_ids, chat_stop_token_ids(tokenizer))


# ------------------------------------------------------------------------ prompts


def max_prompt_bytes(tokenizer: Tokenizer, model: ModelCard) -> int:
    """UTF-8 size above which a text cannot fit the context window: no token covers more
    bytes than the longest one in the vocabulary. Checked before encoding, so a huge
    prompt is refused at once instead of occupying a thread for seconds first."""
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    return model.max_model_len * max(longest, 1)


def check_text_size(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidRequestError(
            field,
            f"{field} is {size} bytes; no text over {limit} bytes fits the context window",
        )


def text_prompt(
    text: str, tokenizer: Tokenizer, text_limit: int, field: str = "prompt"
) -> list[int]:
    """Text encoded with special tokens disallowed (user text never makes control
    tokens). May take a while on long text: run it off the event loop."""
    check_text_size(field, len(text.encode("utf-8")), text_limit)
    ids = tokenizer.encode(text)
    if not ids:
        raise InvalidRequestError(field, f"{field} must hold at least one token")
    return ids


def token_prompt(ids: Sequence[int], model: ModelCard, field: str = "prompt") -> list[int]:
    """Token ids as given, each checked against the vocabulary."""
    if len(ids) > model.max_model_len:
        # Refused by count before each id is looked at (a 4 MB request holds 1M ids).
        raise InvalidRequestError(
            field,
            f"{field} holds {len(ids)} tokens; the context window is {model.max_model_len}",
        )
    out = list(ids)
    for i, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.vocab_size:
            raise InvalidRequestError(
                field,
                f"{field}: token_ids[{i}] = {t!r} is outside the vocabulary "
                f"[0, {model.vocab_size})",
            )
    if not out:
        raise InvalidRequestError(field, f"{field} must hold at least one token")
    return out


# --------------------------------------------------------------------------- chat


def message(field: str, **fields: Any) -> Message:
    """A harmony Message; its ValueError becomes InvalidRequestError naming `field`
    (for example "messages[2]")."""
    try:
        return Message(**fields)
    except ValueError as err:
        raise InvalidRequestError(field, f"{field}: {err}") from err


def tool(
    field: str,
    name: str,
    description: str,
    parameters: Any,
    parameters_field: str = "parameters",
    limits: RequestLimits = DEFAULT_LIMITS,
) -> ToolSpec:
    """A function tool; `parameters` is a JSON-schema object, its JSON text, or None.
    `parameters_field`: the name of the schema's field in the caller's API. JSON text is
    parsed only after its nesting depth is checked (limits.py); a front handing over an
    object it parsed itself checks the depth of its whole body before parsing."""
    where = f"{field}.{parameters_field}"
    if isinstance(parameters, str) and parameters:
        parameters = input_limits.parse_json_object(limits, parameters, where)
    elif isinstance(parameters, str):
        parameters = None
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequestError(where, f"{where} must be a JSON object")
    try:
        return ToolSpec(name=name, description=description or "", parameters=parameters)
    except ValueError as err:
        raise InvalidRequestError(field, f"{field}: {err}") from err


def conversation(
    messages: Sequence[Message],
    *,
    tools: Sequence[ToolSpec] = (),
    reasoning_effort: str = "medium",
    instructions: str | None = None,
    text_limit: int,
    messages_field: str = "messages",
    tools_field: str = "tools",
) -> Conversation:
    """The harmony conversation, checked as a whole. `text_limit`: max_prompt_bytes(),
    applied to the text rendered verbatim (contents and instructions; tool schemas are
    rewritten as TypeScript, often shorter)."""
    if not messages:
        raise InvalidRequestError(
            messages_field, f"{messages_field} must hold at least one message"
        )
    verbatim = sum(len(m.content.encode("utf-8")) for m in messages)
    verbatim += len((instructions or "").encode("utf-8"))
    check_text_size(messages_field, verbatim, text_limit)
    if reasoning_effort not in REASONING_EFFORTS:
        raise InvalidRequestError(
            "reasoning_effort",
            f"reasoning_effort must be one of {list(REASONING_EFFORTS)}, got {reasoning_effort!r}",
        )
    try:
        return Conversation(
            messages=tuple(messages),
            reasoning_effort=reasoning_effort,
            tools=tuple(tools),
            instructions=instructions or None,
        )
    except ValueError as err:
        # The one cross-message rule left: tool names must be distinct.
        raise InvalidRequestError(tools_field, f"{tools_field}: {err}") from err


@dataclass(frozen=True)
class ForcedCall:
    """The assistant turn starts already addressed to a function (tool_choice): the
    prompt ends inside the call's header. Naming the function, the header is complete and
    the model writes only the JSON arguments; with `name` None ("required": some
    function), the header stops after "to=functions." and the model names the function
    (one of those offered, as far as the model follows its prompt: nothing constrains the
    sampling). `header_ids` are the tokens appended after <|start|>assistant; the output
    parser is fed them first, so it sees the whole message."""

    name: str | None
    header_ids: tuple[int, ...]


def forced_call(name: str | None, tokenizer: Tokenizer) -> ForcedCall:
    """The header gpt-oss itself writes for a call: <|channel|>commentary
    to=functions.NAME <|constrain|>json<|message|> (up to "to=functions." for None)."""
    sp = tokenizer.special
    if name is None:
        ids = [sp.channel, *tokenizer.encode("commentary to=functions.")]
        return ForcedCall(None, tuple(ids))
    ids = [sp.channel, *tokenizer.encode(f"commentary to=functions.{name} ")]
    ids += [sp.constrain, *tokenizer.encode("json"), sp.message]
    return ForcedCall(name, tuple(ids))


def chat_prompt(
    conv: Conversation, tokenizer: Tokenizer, forced: ForcedCall | None = None
) -> list[int]:
    """The rendered prompt, ending with <|start|>assistant (and a forced call's header).
    May take a while on long conversations: run it off the event loop."""
    ids = render_conversation(conv, tokenizer)
    if forced is not None:
        ids += forced.header_ids
    return ids
