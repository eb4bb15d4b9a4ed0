"""Hostile input is refused by field, never turned into an internal error (RELIABILITY.md
targets 9, 10 and 18; cluster/api/limits.py).

- The JSON depth scan against an independent measure (the depth of what json.loads
  builds) on generated documents whose strings hold brackets, quotes and escapes.
- The inputs that used to reach INTERNAL or burn seconds of CPU, through a real gRPC
  server over loopback: each answers INVALID_ARGUMENT naming its field.
- Property-based fuzzing (hypothesis) of the gRPC request converters as the servicer
  runs them (convert, then harmony rendering, then SamplingParams), on structured
  requests and on arbitrary bytes parsed as requests: every outcome is a converted
  request or InvalidRequestError / SamplingParamsError, within a bounded time each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.cluster.api import convert, limits
from tandem.cluster.api.backend import InvalidRequestError, ModelCard
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.limits import RequestLimits
from tandem.cluster.api.proto_scan import first_over_limit
from tandem.cluster.client import TandemClient
from tandem.workers.engine.sampling_params import SamplingParamsError
from tandem.workers.synthetic.tiny_model import default_model_dir
from tandem.workers.text.harmony import render_conversation
from tandem.workers.text.tokenizer import Tokenizer
from tests.support.api_server import MAX_MODEL_LEN, EventLoopThread, new_backend

LIMITS = RequestLimits()
# Per generated request: generous for a loaded 2-core machine; an unbounded path (the
# seconds a 350,000-message chat used to cost) exceeds it by far.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# ------------------------------------------------------------------- JSON depth


def _depth(value: object) -> int:
    """Independent measure: the nesting of the parsed value."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{}"\\ab\n\u00e9'), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


@FUZZ
@given(JSON_VALUES, st.booleans())
def test_json_depth_is_the_parsed_depth(value, ascii_only):
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert limits.json_depth(text) == _depth(json.loads(text))


def test_json_depth_edges():
    assert limits.json_depth("") == 0
    assert limits.json_depth("1") == 0
    assert limits.json_depth("[[]]") == 2
    assert limits.json_depth('["[[[", {"k": "}}}"}]') == 2
    assert limits.json_depth('"\\"[[["') == 0
    assert limits.json_depth(nested(500)) == 500


def test_parse_json_object_refuses_by_field():
    where = "tools[0].parameters_json"
    ok = '{"type": "object", "properties": {"x": {"type": "integer"}}}'
    assert limits.parse_json_object(LIMITS, ok, where) == json.loads(ok)
    cases = [nested(500), nested(LIMITS.max_json_depth + 1), "[" * 100_000, "{", "[1]", "1e999x"]
    for text in cases:
        with pytest.raises(InvalidRequestError) as info:
            limits.parse_json_object(LIMITS, text, where)
        assert info.value.field == where
    assert limits.parse_json_object(LIMITS, nested(LIMITS.max_json_depth), where)


def test_logit_bias_limits():
    field = "logit_bias"
    limits.check_logit_bias(LIMITS, {"5": 1.5, 7: -100}, vocab_size=10, field=field)
    bad = [
        {str(i): 0 for i in range(LIMITS.max_logit_bias_entries + 1)},
        {"x": 1},
        {"10": 1},
        {"-1": 1},
        {"3": 101},
        {"3": float("nan")},
        {"3": "1"},
        {"3": True},
    ]
    for bias in bad:
        with pytest.raises(InvalidRequestError) as info:
            limits.check_logit_bias(LIMITS, bias, vocab_size=10, field=field)
        assert info.value.field == field, bias


def test_limits_are_validated():
    for bad in ({"max_messages": 0}, {"max_json_depth": -1}, {"max_request_bytes": 100}):
        with pytest.raises(ValueError):
            RequestLimits(**bad)


# --------------------------------------------------------- hostile requests, served


@pytest.fixture(scope="module")
def client() -> Iterator[TandemClient]:
    loop_thread = EventLoopThread()
    backend, _, _ = new_backend(default_model_dir())
    # Many invalid requests on one channel, on purpose: no refusal budget here (its own
    # test is tests/test_refusals.py).
    server = loop_thread.start_server(backend, refusals=None)
    with TandemClient(server.target) as c:
        yield c
    loop_thread.run(server.stop(0))
    loop_thread.run(backend.close())
    loop_thread.close()


def _user(n: int) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role="user") for _ in range(n)]


HOSTILE_CHATS = {
    # The two: a schema 500 levels deep (was INTERNAL, RecursionError), and
    # 350,000 empty user messages (2.8 MB: passed the content-size check, 3.6 s of CPU).
    "deep tool schema": (
        pb.ChatRequest(
            messages=_user(1),
            tools=[
                pb.Tool(name="f", parameters_json='{"type": "object", "x": ' + nested(500) + "}")
            ],
        ),
        "tools[0].parameters_json",
    ),
    # Now over max_request_bytes (2 MiB): refused before it is parsed.
    "350,000 empty messages": (pb.ChatRequest(messages=_user(350_000)), "request"),
    # Under it (1.6 MB): refused by count before any message is converted.
    "200,000 empty messages": (pb.ChatRequest(messages=_user(200_000)), "messages"),
    # The most messages that fit the byte limit (2 bytes each).
    "1,000,000 bare messages": (
        pb.ChatRequest(messages=[pb.ChatMessage()] * 1_000_000),
        "messages",
    ),
    "too many tools": (
        pb.ChatRequest(messages=_user(1), tools=[pb.Tool(name=f"f{i}") for i in range(129)]),
        "tools",
    ),
    "huge tool schemas": (
        pb.ChatRequest(
            messages=_user(1),
            tools=[pb.Tool(name="f", description="d" * (LIMITS.max_tool_bytes + 1))],
        ),
        "tools",
    ),
    "over the request bytes": (
        pb.ChatRequest(messages=[pb.ChatMessage(role="user", name="n" * 3_000_000)]),
        "request",
    ),
    "many stop strings": (
        pb.ChatRequest(messages=_user(1), params=pb.SamplingParameters(stop=["s"] * 100_000)),
        "stop",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_CHATS))
def test_hostile_chat_is_invalid_argument_naming_the_field(client, case):
    request, field = HOSTILE_CHATS[case]
    with pytest.raises(grpc.RpcError) as info:
        list(client._stub.Chat(request, timeout=60))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert dict(err.trailing_metadata())["tandem-field"] == field, err.details()
    assert err.details().startswith(field)


def test_hostile_generate_is_invalid_argument_naming_the_field(client):
    cases = [
        # 3 MB of ids (5 bytes each): refused by size before it is even parsed.
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**30] * 600_000)), "request"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * (MAX_MODEL_LEN + 1))), "prompt"),
        (
            pb.GenerateRequest(
                text="hi", params=pb.SamplingParameters(stop_token_ids=list(range(5000)))
            ),
            "stop_token_ids",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(client._stub.Generate(request, timeout=60))
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert dict(err.trailing_metadata())["tandem-field"] == field, err.details()
    # And the server still serves.
    assert list(client.generate("fine", max_tokens=2))[-1].usage.completion_tokens == 2


# ---------------------------------------------------------- fuzzing the converters


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


@pytest.fixture(scope="module")
def card(tokenizer) -> ModelCard:
    return ModelCard(id="tiny", max_model_len=MAX_MODEL_LEN, vocab_size=tokenizer.vocab_size)


REFUSALS = (InvalidRequestError, SamplingParamsError)

SHORT = st.text(max_size=12)
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", "", "wizard"])
CHANNELS = st.sampled_from(["", "analysis", "commentary", "final", "bogus"])
JSON_TEXT = st.one_of(
    st.just(""),
    JSON_VALUES.map(json.dumps),
    st.integers(0, 300).map(nested),
    st.integers(1, 3000).map(lambda n: "[" * n),
    SHORT,
)
SAMPLING = st.builds(
    pb.SamplingParameters,
    temperature=st.none() | st.floats(),
    top_p=st.none() | st.floats(),
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    min_p=st.none() | st.floats(),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    max_tokens=st.none() | st.integers(-(2**31), 2**31 - 1),
    min_tokens=st.none() | st.integers(-5, 300),
    logprobs=st.none() | st.integers(-2, 30),
    stop=st.lists(st.text(max_size=300), max_size=70),
    stop_token_ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
)
CHATS = st.builds(
    pb.ChatRequest,
    messages=st.lists(
        st.builds(
            pb.ChatMessage,
            role=ROLES,
            content=st.text(max_size=40),
            channel=CHANNELS,
            recipient=st.sampled_from(["", "functions.f", "functions.", "browser.search", "x"]),
            name=st.sampled_from(["", "f", "functions.f"]),
        ),
        max_size=6,
    ),
    tools=st.lists(
        st.builds(
            pb.Tool,
            name=st.sampled_from(["f", "g", "bad name", "", "x" * 65]),
            description=SHORT,
            parameters_json=JSON_TEXT,
        ),
        max_size=3,
    ),
    reasoning_effort=st.integers(0, 5),
    instructions=SHORT,
    params=SAMPLING,
    request_id=SHORT,
)
GENERATES = st.builds(
    pb.GenerateRequest,
    text=st.text(max_size=60),
    params=SAMPLING,
    request_id=SHORT,
) | st.builds(
    pb.GenerateRequest,
    token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=300)),
    params=SAMPLING,
)


def run_chat(request: pb.ChatRequest, tokenizer: Tokenizer, card: ModelCard) -> None:
    """What TandemServicer.Chat does before the backend: any exception but a refusal
    would be INTERNAL there."""
    try:
        conv = convert.conversation(request, convert.max_prompt_bytes(tokenizer, card), LIMITS)
        render_conversation(conv, tokenizer)
        convert.chat_sampling_params(request.params, tokenizer)
        convert.request_id(request.request_id)
    except REFUSALS:
        pass


def run_generate(request: pb.GenerateRequest, tokenizer: Tokenizer, card: ModelCard) -> None:
    try:
        prompt = convert.prompt_token_ids(
            request, tokenizer, card, convert.max_prompt_bytes(tokenizer, card), LIMITS
        )
        params = convert.sampling_params(request.params)
        # The backend's admission check (the ingress runs it before placing a request).
        params.check_against_model(len(prompt), card.max_model_len, card.vocab_size)
        convert.request_id(request.request_id)
    except REFUSALS:
        pass


@FUZZ
@given(request=CHATS)
def test_fuzzed_chat_requests_convert_or_are_refused(request, tokenizer, card):
    run_chat(request, tokenizer, card)


@FUZZ
@given(request=GENERATES)
def test_fuzzed_generate_requests_convert_or_are_refused(request, tokenizer, card):
    run_generate(request, tokenizer, card)


@FUZZ
@given(data=st.binary(max_size=512), kind=st.sampled_from(["chat", "generate"]))
def test_fuzzed_bytes_convert_or_are_refused(data, kind, tokenizer, card):
    """Arbitrary bytes as the server receives them: unparsable ones are refused by the
    deserializer (not here); whatever parses goes through the converters."""
    message_cls = pb.ChatRequest if kind == "chat" else pb.GenerateRequest
    try:
        request = message_cls.FromString(data)
    except Exception:  # DecodeError: the server answers INVALID_ARGUMENT "request"
        return
    (run_chat if kind == "chat" else run_generate)(request, tokenizer, card)


# ------------------------------------------------- JSON bodies (the HTTP front's path)


def test_json_body_limits_name_the_field():
    cases = [
        (b"[" * 100_000 + b"]" * 100_000, "body"),
        (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
        (b"\xff\xfe", "body"),
        (b'{"messages": [', "body"),
        (b" " * (LIMITS.max_request_bytes + 1), "body"),
    ]
    for raw, field in cases:
        with pytest.raises(InvalidRequestError) as info:
            limits.parse_json_body(LIMITS, raw)
        assert info.value.field == field, raw[:40]
    many = json.dumps({"messages": [{}] * (LIMITS.max_messages + 1)}).encode()
    tools = json.dumps({"messages": [], "tools": [{}] * (LIMITS.max_tools + 1)}).encode()
    items = json.dumps({"input": [{}] * (LIMITS.max_messages + 1)}).encode()
    for raw, key, field in (
        (many, "messages", "messages"),
        (tools, "messages", "tools"),
        (items, "input", "input"),
    ):
        body = limits.parse_json_body(LIMITS, raw)
        with pytest.raises(InvalidRequestError) as info:
            limits.check_json_chat_sizes(LIMITS, body, messages_key=key)
        assert info.value.field == field
    ok = {"messages": [{"role": "user", "content": "[[["}], "tools": [{"type": "function"}]}
    assert limits.parse_json_body(LIMITS, json.dumps(ok).encode()) == ok
    limits.check_json_chat_sizes(LIMITS, ok)


JSON_BODIES = st.one_of(
    st.binary(max_size=512),
    JSON_VALUES.map(lambda v: json.dumps({"messages": v, "tools": v}).encode()),
    st.integers(0, 5000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}"),
    st.integers(0, 5000).map(lambda n: b"{" * n),
)


@FUZZ
@given(raw=JSON_BODIES, key=st.sampled_from(["messages", "input"]))
def test_fuzzed_json_bodies_parse_or_are_refused(raw, key):
    try:
        body = limits.parse_json_body(LIMITS, raw)
        limits.check_json_chat_sizes(LIMITS, body, messages_key=key)
    except InvalidRequestError:
        pass


# ------------------------------------------ fuzzing the HTTP front's request converters

ANY_JSON = JSON_VALUES
HTTP_MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"])},
        optional={
            "content": st.none()
            | st.text(max_size=30)
            | st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["text", "image_url", "input_text"])},
                    optional={"text": st.text(max_size=10) | ANY_JSON},
                ),
                max_size=3,
            )
            | ANY_JSON,
            "name": SHORT,
            "tool_call_id": SHORT,
            "reasoning": st.text(max_size=10),
            "reasoning_content": st.text(max_size=10),
            "tool_calls": st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.just("function"),
                        "function": st.fixed_dictionaries(
                            {"name": SHORT, "arguments": st.text(max_size=20)}
                        ),
                    },
                    optional={"id": SHORT},
                ),
                max_size=2,
            ),
        },
    ),
    max_size=5,
)
HTTP_TOOLS = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "browser"]),
            "function": st.fixed_dictionaries(
                {"name": st.sampled_from(["f", "g", "bad name", ""])},
                optional={
                    "description": SHORT,
                    "parameters": st.dictionaries(TRICKY_TEXT, ANY_JSON, max_size=3)
                    | st.integers(0, 300).map(lambda n: json.loads(nested(n))),
                },
            ),
        }
    ),
    max_size=3,
)
HTTP_SAMPLING = {
    "temperature": st.floats() | st.integers(),
    "top_p": st.floats(),
    "top_k": st.integers(-(2**40), 2**40),
    "max_tokens": st.integers(-(2**40), 2**40),
    "seed": st.integers(-(2**70), 2**70),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=300), max_size=70),
    "stop_token_ids": st.lists(st.integers(-(2**40), 2**40), max_size=5),
    "logprobs": st.booleans() | st.integers(-3, 30),
    "top_logprobs": st.integers(-3, 30),
    "n": st.integers(-1, 3),
    "request_id": st.text(max_size=200),
}
CHAT_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other"]), "messages": HTTP_MESSAGES},
    optional={
        "tools": HTTP_TOOLS,
        "tool_choice": st.sampled_from(["none", "auto", "required", "bogus"])
        | st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": SHORT})}
        ),
        "reasoning_effort": st.sampled_from(["low", "medium", "high", "max"]),
        "response_format": st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "json_object"])}
        ),
        **HTTP_SAMPLING,
    },
)
COMPLETION_BODIES = st.fixed_dictionaries(
    {
        "model": st.just("tiny"),
        "prompt": st.text(max_size=40)
        | st.lists(st.integers(-(2**40), 2**40), max_size=300)
        | st.lists(st.text(max_size=5), max_size=2)
        | ANY_JSON,
    },
    optional={
        "echo": st.booleans(),
        "suffix": SHORT,
        "best_of": st.integers(0, 2),
        **HTTP_SAMPLING,
    },
)
RESPONSE_BODIES = st.fixed_dictionaries(
    {
        "model": st.just("tiny"),
        "input": st.text(max_size=30)
        | st.lists(
            st.dictionaries(
                st.sampled_from(
                    ["type", "role", "content", "name", "arguments", "call_id", "output", "summary"]
                ),
                ANY_JSON
                | st.sampled_from(
                    [
                        "message",
                        "user",
                        "assistant",
                        "function_call",
                        "function_call_output",
                        "reasoning",
                        "input_text",
                    ]
                ),
                max_size=5,
            ),
            max_size=4,
        ),
    },
    optional={
        "instructions": SHORT,
        "tools": st.lists(
            st.dictionaries(
                st.sampled_from(["type", "name", "description", "parameters"]),
                ANY_JSON | st.sampled_from(["function", "f"]),
                max_size=4,
            ),
            max_size=3,
        ),
        "reasoning": st.fixed_dictionaries({}, optional={"effort": st.sampled_from(["low", "x"])}),
        "max_output_tokens": st.integers(-5, 2**40),
        **HTTP_SAMPLING,
    },
)


def _http_body(body: dict) -> object:
    """As the HTTP front reads a body: bytes, then parse_json_body."""
    return limits.parse_json_body(LIMITS, json.dumps(body).encode())


@FUZZ
@given(body=CHAT_BODIES)
def test_fuzzed_http_chat_bodies_convert_or_are_refused(body, tokenizer, card):
    """OpenAIFront.chat_completions up to the backend (cluster/http/app.py)."""
    from tandem.cluster.api import prepare
    from tandem.cluster.http import chat
    from tandem.cluster.http.schema import ChatCompletionRequest, parse_body

    try:
        data = _http_body(body)
        limits.check_json_chat_sizes(LIMITS, data)
        parsed = parse_body(ChatCompletionRequest, data)
        prepared = chat.prepare_chat(parsed, tokenizer, convert.max_prompt_bytes(tokenizer, card))
        prompt = prepare.chat_prompt(prepared.conversation, tokenizer, prepared.forced)
        params = chat.sampling_for(prepared, tokenizer)
        params.check_against_model(len(prompt), card.max_model_len, card.vocab_size)
        prepare.request_id(parsed.request_id)
    except REFUSALS:
        pass


@FUZZ
@given(body=COMPLETION_BODIES)
def test_fuzzed_http_completion_bodies_convert_or_are_refused(body, tokenizer, card):
    from tandem.cluster.api import prepare
    from tandem.cluster.http import completions
    from tandem.cluster.http.schema import CompletionRequest, parse_body

    try:
        parsed = parse_body(CompletionRequest, _http_body(body))
        given_ = completions.sampling(parsed)
        prompt = completions.prompt_ids(
            parsed, tokenizer, card, convert.max_prompt_bytes(tokenizer, card)
        )
        stop_ids = tuple(parsed.stop_token_ids or ())
        params = prepare.sampling_params(given_, completions.stop(parsed), stop_ids)
        params.check_against_model(len(prompt), card.max_model_len, card.vocab_size)
        prepare.request_id(parsed.request_id)
    except REFUSALS:
        pass


@FUZZ
@given(body=RESPONSE_BODIES)
def test_fuzzed_http_responses_bodies_convert_or_are_refused(body, tokenizer, card):
    from tandem.cluster.api import prepare
    from tandem.cluster.http import responses
    from tandem.cluster.http.schema import ResponsesRequest, parse_body

    try:
        data = _http_body(body)
        limits.check_json_chat_sizes(LIMITS, data, messages_key="input")
        parsed = parse_body(ResponsesRequest, data)
        conv = responses.conversation(parsed, convert.max_prompt_bytes(tokenizer, card))
        prompt = prepare.chat_prompt(conv, tokenizer)
        stop_ids = tuple(parsed.stop_token_ids or ())
        params = prepare.chat_sampling_params(responses.sampling(parsed), tokenizer, (), stop_ids)
        params.check_against_model(len(prompt), card.max_model_len, card.vocab_size)
    except REFUSALS:
        pass


# ------------------------------------------------------- counting before parsing


@FUZZ
@given(request=CHATS, extra_messages=st.integers(0, 40), limit=st.integers(0, 12))
def test_wire_count_agrees_with_the_parser(request, extra_messages, limit):
    """proto_scan.first_over_limit against protobuf's own parser (the reference)."""
    request.messages.extend([pb.ChatMessage(role="user", content="x")] * extra_messages)
    data = request.SerializeToString()
    messages = pb.ChatRequest.DESCRIPTOR.fields_by_name["messages"].number
    tools = pb.ChatRequest.DESCRIPTOR.fields_by_name["tools"].number
    over = first_over_limit(data, {messages: limit, tools: limit})
    parsed = pb.ChatRequest.FromString(data)
    counts = {messages: len(parsed.messages), tools: len(parsed.tools)}
    if over is None:
        assert all(n <= limit for n in counts.values())
    else:
        field, reached = over
        assert reached == limit + 1 and counts[field] > limit


@FUZZ
@given(data=st.binary(max_size=256))
def test_wire_count_never_raises_on_junk(data):
    over = first_over_limit(data, {1: 2, 2: 2})
    if over is not None:
        assert over[1] == 3
