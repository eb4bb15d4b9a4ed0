"""Bounds on what one request may make the ingress do (RELIABILITY.md targets 9, 10, 18).

A hostile request must be refused, naming its field, before the front does work that
grows with it: the checks here run in time proportional to the request's encoded size
(itself capped first), and the expensive steps after them (JSON parsing, harmony
rendering, tokenizing) only ever see input within these bounds.

    encoded request ──max_request_bytes──> counts (messages, tools, logit_bias)
        ──> tool texts (max_tool_bytes) ──> JSON depth (max_json_depth) ──> json.loads

Shared by every front: the gRPC converters (convert.py) pass a proto's encoded size and
repeated fields; the HTTP front passes its body's length and JSON lists. Both refuse with
InvalidRequestError naming the field in the API's own terms ("messages", "tools[2]
.parameters_json", "logit_bias"). Stop strings and stop token ids are bounded where they
become SamplingParams (MAX_STOP_STRINGS and friends in sampling_params.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence, Sized
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from tandem.cluster.api.backend import InvalidRequestError


@dataclass(frozen=True)
class RequestLimits:
    max_request_bytes: int = 2 * 1024 * 1024
    # Encoded size of one request (protobuf bytes, or an HTTP body): over three times a
    # full 131,072-token gpt-oss context of text (~4.5 bytes a token). Checked before
    # parsing: parsing 2.8 MB of 350,000 messages alone takes ~30 ms of the front's
    # thread. The gRPC transport refuses messages over twice this before reading them
    # (RESOURCE_EXHAUSTED).
    max_messages: int = 4096
    # Messages in one conversation. Counted before any is looked at: 350,000 empty
    # messages are 2.8 MB yet cost seconds of CPU to convert and render.
    max_tools: int = 128
    # Function tools in one request (OpenAI's own cap).
    max_tool_bytes: int = 256 * 1024
    # Total UTF-8 bytes of every tool's name, description and JSON schema in one request:
    # schemas are rendered as TypeScript in Python, holding the GIL for the whole render.
    max_json_depth: int = 64
    # Nesting of a JSON document the front parses (tool schemas): deeper input would
    # exhaust the parser's recursion (RecursionError) and the schema renderer's.
    max_logit_bias_entries: int = 1024
    # Token ids given a logit bias in one request (as many as stop_token_ids may hold).

    def __post_init__(self) -> None:
        for name in (
            "max_request_bytes",
            "max_messages",
            "max_tools",
            "max_tool_bytes",
            "max_json_depth",
            "max_logit_bias_entries",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RequestLimits.{name} must be a positive integer, got {value!r}")
        if self.max_request_bytes < 1024:
            raise ValueError(
                f"RequestLimits.max_request_bytes must be >= 1024, got {self.max_request_bytes}"
            )


DEFAULT_LIMITS = RequestLimits()
Tool = TypeVar("Tool")

# ------------------------------------------------------------------------ checks


def check_chat_sizes(
    limits: RequestLimits,
    *,
    request_bytes: int | Callable[[], int],
    messages: Sized,
    tools: Sequence[Tool],
    tool_bytes: Callable[[Tool], int],
    messages_field: str = "messages",
    tools_field: str = "tools",
) -> None:
    """A chat request's sizes, cheapest first and before any message or tool is converted:
    message and tool counts, encoded bytes (`request_bytes` may be a function: a proto's
    ByteSize() walks every message), then the tools' total text (`tool_bytes` measures one
    tool as the front holds it)."""
    check_count(messages_field, len(messages), limits.max_messages, "messages")
    check_count(tools_field, len(tools), limits.max_tools, "tools")
    check_request_bytes(limits, request_bytes() if callable(request_bytes) else request_bytes)
    check_tool_bytes(limits, sum(tool_bytes(t) for t in tools), tools_field)


def check_request_bytes(limits: RequestLimits, size: int, field: str = "request") -> None:
    """The request's encoded size, before anything in it is converted."""
    if size > limits.max_request_bytes:
        raise InvalidRequestError(
            field, f"{field} is {size} bytes encoded; at most {limits.max_request_bytes}"
        )


def check_count(field: str, count: int, limit: int, what: str) -> None:
    """A list field's length, checked before any element is looked at."""
    if count > limit:
        raise InvalidRequestError(field, f"{field} holds {count} {what}; at most {limit}")


def check_tool_bytes(limits: RequestLimits, size: int, field: str = "tools") -> None:
    """`size`: the UTF-8 bytes of every tool's name, description and schema together."""
    if size > limits.max_tool_bytes:
        raise InvalidRequestError(
            field,
            f"{field}: names, descriptions and schemas total {size} bytes; "
            f"at most {limits.max_tool_bytes}",
        )


# A JSON string (escapes included) and a run of characters that are no bracket: what the
# depth scan throws away, in C, before it looks at brackets.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of a JSON text nest ("1": 0, "[[]]": 2), without
    parsing it: brackets inside strings are dropped, then the running depth is a cumulative
    sum. Linear in len(text), vectorised (256 KiB in ~10 ms). Exact for valid JSON; for
    invalid JSON the value may be anything, and json.loads refuses the text anyway."""
    skeleton = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    if not skeleton:
        return 0
    brackets = np.frombuffer(skeleton.encode("ascii"), dtype=np.uint8)
    opens = (brackets == ord("[")) | (brackets == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1), dtype=np.int64).max())


def check_json_depth(limits: RequestLimits, text: str, field: str) -> None:
    """For a JSON body parsed by a framework (HTTP): run before the parser sees it."""
    depth = json_depth(text)
    if depth > limits.max_json_depth:
        raise InvalidRequestError(
            field, f"{field} nests {depth} levels deep; at most {limits.max_json_depth}"
        )


def parse_json_object(limits: RequestLimits, text: str, field: str) -> dict:
    """A JSON object from client text (a tool schema), its depth checked before parsing."""
    check_json_depth(limits, text, field)
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        # ValueError covers JSONDecodeError; RecursionError cannot follow the depth check
        # on valid JSON, and is caught anyway so no text can turn into an internal error.
        raise InvalidRequestError(field, f"{field} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise InvalidRequestError(field, f"{field} must be a JSON object")
    return value


def parse_json_body(limits: RequestLimits, raw: bytes, field: str = "body") -> object:
    """A JSON request body (HTTP): size, then nesting depth, then json.loads, so neither a
    huge nor a deeply nested body reaches the parser."""
    check_request_bytes(limits, len(raw), field)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidRequestError(field, f"{field}: not UTF-8 ({err})") from None
    check_json_depth(limits, text, field)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InvalidRequestError(field, f"{field}: not valid JSON ({err})") from None


def check_json_chat_sizes(
    limits: RequestLimits,
    body: object,
    messages_key: str = "messages",
    tools_key: str = "tools",
) -> None:
    """check_chat_sizes on a body from parse_json_body (its bytes already checked), before
    a schema library builds objects for every message (350,000 of them cost seconds
    there too). Values of the wrong type are left for the schema's own error."""
    if not isinstance(body, dict):
        return
    messages = body.get(messages_key)
    tools = body.get(tools_key)
    check_chat_sizes(
        limits,
        request_bytes=0,
        messages=messages if isinstance(messages, list) else (),
        tools=tools if isinstance(tools, list) else (),
        tool_bytes=lambda t: len(json.dumps(t, ensure_ascii=False).encode()),
        messages_field=messages_key,
        tools_field=tools_key,
    )


def check_logit_bias(limits: RequestLimits, bias: dict, vocab_size: int, field: str) -> None:
    """A logit-bias map {token id: bias}: entry count first, then ids in the vocabulary and
    finite biases in [-100, 100] (OpenAI's range)."""
    check_count(field, len(bias), limits.max_logit_bias_entries, "entries")
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise InvalidRequestError(field, f"{field}: key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                field, f"{field}: token id {token} is outside the vocabulary [0, {vocab_size})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(field, f"{field}[{key}] must be a number")
        if not -100.0 <= value <= 100.0:  # NaN fails both comparisons
            raise InvalidRequestError(field, f"{field}[{key}] must be in [-100, 100]")
