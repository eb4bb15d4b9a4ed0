"""The OpenAI-compatible HTTP API, spoken to by OpenAI's own Python client.

One real cluster for the module (local Ray, a private redis-server, Serve's HTTP proxy
routing to the Ingress, 1 prefill + 1 decode replica of the tiny model on CPU, the API
key set): chat completions, responses, completions and models through the `openai`
client, every answer re-validated against the client's own pydantic types (a field the
server left out fails there); errors as the client's typed exceptions; a disconnect
aborting the request on every worker; the README's examples run as written.

Faults that need a stopped engine (a full queue, a deadline) run on the same HTTP app
served by uvicorn over an in-process engine with fault hooks (tests/support/api_server).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx2 as httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from ray import serve

from tandem.cluster.api.server import FIELD_METADATA_KEY
from tandem.cluster.client import TandemClient
from tandem.cluster.config import DECODE, PREFILL, ConfigOverrides, load_app_config
from tandem.cluster.http.app import HttpConfig
from tandem.workers.engine.llm_engine import EngineConfig, LLMEngine
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.synthetic.tiny_model import TINY_MODEL_VERSION
from tandem.workers.text.harmony import Conversation, Message, render_conversation
from tests.support.api_server import EventLoopThread, HttpServer, new_backend
from tests.support.cluster import TEST_ENGINE, free_port, serve_cluster, wait_for
from tests.support.replay_backend import ReplayBackend, harmony_ids

REPO = Path(__file__).resolve().parents[1]
# The embedded model's id as `tandem serve` names it (the README's curl example uses it).
MODEL = f"tiny-gpt-oss-v{TINY_MODEL_VERSION}"
API_KEY = "http-test-key-0123456789"
ENGINE = TEST_ENGINE
GREEDY = {"temperature": 0.0}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def strict(model_type, obj):
    """Re-validate what the client parsed (it builds its objects without validating)
    against its own type: a required field the server left out fails here."""
    data = obj if isinstance(obj, dict) else obj.to_dict()
    return TypeAdapter(model_type).validate_python(data)


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    port = free_port()
    old_key = os.environ.get("TANDEM_API_KEY")
    # The replicas inherit the environment of the process that starts Ray.
    os.environ["TANDEM_API_KEY"] = API_KEY
    try:
        with serve_cluster(
            str(tiny_model_dir),
            app="tandem-http",
            cluster_name="http",
            engine=ENGINE,
            placement={"prefill": "least_loaded", "decode": "least_loaded"},
            prefill=1,
            decode=1,
            ingress=1,
            disagg={"local_prefill_threshold": 16, "transfer_deadline_s": 10.0},
            http_port=port,
            model_id=MODEL,
        ) as running:
            base = f"http://127.0.0.1:{port}/v1"
            wait_for(lambda: _answers(base), 60, "the HTTP proxy to route to the Ingress")
            yield running, base
    finally:
        if old_key is None:
            os.environ.pop("TANDEM_API_KEY", None)
        else:
            os.environ["TANDEM_API_KEY"] = old_key


def _answers(base: str) -> bool:
    try:
        r = httpx.get(f"{base}/models", headers={"Authorization": f"Bearer {API_KEY}"})
    except httpx.HTTPError:
        return False
    return r.status_code == 200


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[openai.OpenAI]:
    # max_retries=0: a 429 or 5xx must reach the test, not be retried away.
    with openai.OpenAI(base_url=cluster[1], api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> LLMEngine:
    return LLMEngine.from_model_dir(tiny_model_dir, EngineConfig(**ENGINE))


def _chat(client, **kwargs) -> ChatCompletion:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, **kwargs)
    return strict(ChatCompletion, raw.http_response.json())


# ----------------------------------------------------------------------- models


def test_models_lists_the_served_model(client):
    models = list(client.models.list())
    assert [strict(Model, m).id for m in models] == [MODEL]


def test_ingress_still_answers_handle_calls(cluster):
    """The Ingress became an ASGI deployment (serve.ingress); its introspection methods,
    called through Serve handles by operators and the router tests, still answer."""
    running, _ = cluster
    (rid,) = running.ingress_replicas()
    state = running.ingress_call(rid, "router_state")
    assert state["replica_id"] == rid


# ------------------------------------------------------------------------- chat


def test_chat_plain_with_reasoning_effort(client, tiny_model_dir, reference):
    tok = reference.tokenizer
    for effort in ("low", "high"):
        done = _chat(client, messages=USER, max_tokens=12, reasoning_effort=effort, **GREEDY)
        choice = done.choices[0]
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.role == "assistant"
        # The prompt is the harmony rendering with the effort asked for.
        conv = Conversation(
            messages=(Message("user", USER[0]["content"]),), reasoning_effort=effort
        )
        assert done.usage.prompt_tokens == len(render_conversation(conv, tok))
        assert 1 <= done.usage.completion_tokens <= 12
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
        assert done.model == MODEL and done.object == "chat.completion"


def test_chat_stream_equals_plain_and_reports_cached_tokens(client):
    kwargs = dict(messages=USER, max_tokens=16, ignore_eos=True, **GREEDY)
    plain = client.chat.completions.create(model=MODEL, **_extra(kwargs))
    chunks = [
        strict(ChatCompletionChunk, c)
        for c in client.chat.completions.create(
            model=MODEL, stream=True, stream_options={"include_usage": True}, **_extra(kwargs)
        )
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(
        (c.choices[0].delta.to_dict().get("reasoning") or "") for c in chunks if c.choices
    )
    message = plain.choices[0].message
    assert content == (message.content or "")
    assert reasoning == (message.to_dict().get("reasoning") or "")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason == "length"
    assert all(f is None for f in finishes[:-1])
    # include_usage: one last chunk without choices carries the usage; the same prompt
    # a second time was served from the decode worker's prefix cache.
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert usage.completion_tokens == 16 and usage.prompt_tokens == plain.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0


def _extra(kwargs: dict) -> dict:
    """Parameters beyond OpenAI's own go in the body through extra_body."""
    out = dict(kwargs)
    extra = {k: out.pop(k) for k in ("ignore_eos", "top_k", "min_p") if k in out}
    if extra:
        out["extra_body"] = extra
    return out


def test_chat_logprobs(client):
    done = _chat(
        client,
        messages=USER,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    content = done.choices[0].logprobs.content
    # One entry per sampled token (control tokens of the harmony turn included).
    assert len(content) == done.usage.completion_tokens == 5
    for entry in content:
        assert entry.logprob <= 0.0 and 1 <= len(entry.top_logprobs) <= 2
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_chat_forced_tool_call_plain_and_streamed(client):
    """tool_choice naming a function: the turn is that call, on the real model (greedy,
    so streamed and plain agree); its exact shapes are pinned on replayed tokens below."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = dict(messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=24, **GREEDY)
    plain = _chat(client, **kwargs)
    (call,) = plain.choices[0].message.tool_calls or [None]
    chunks = [
        strict(ChatCompletionChunk, c)
        for c in client.chat.completions.create(model=MODEL, stream=True, **kwargs)
    ]
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or ())]
    # As OpenAI streams calls: the first delta names the call, later ones add arguments.
    assert deltas and deltas[0].index == 0 and deltas[0].type == "function"
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    streamed_args = "".join(d.function.arguments or "" for d in deltas)
    finish = chunks[-1].choices[0].finish_reason
    assert finish == plain.choices[0].finish_reason
    # Random weights may run the arguments past max_tokens ("length", the call as far
    # as it got, as OpenAI reports a cut-short call).
    assert finish in ("tool_calls", "length")
    assert call.function.name == "get_weather" and call.function.arguments == streamed_args


def test_chat_tools_reach_the_prompt_and_reasoning_comes_back(client):
    without = _chat(client, messages=USER, max_tokens=1, **GREEDY)
    with_tools = _chat(client, messages=USER, tools=TOOLS, max_tokens=1, **GREEDY)
    none = _chat(client, messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1, **GREEDY)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens
    assert none.usage.prompt_tokens == without.usage.prompt_tokens

    def turn(reasoning_key: str | None) -> list[dict]:
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        }
        if reasoning_key:
            assistant[reasoning_key] = "The user wants the weather; call the tool."
        tool = {"role": "tool", "tool_call_id": "call_1", "content": '{"sunny": true}'}
        return [*USER, assistant, tool]

    counts = {
        key: _chat(client, messages=turn(key), tools=TOOLS, max_tokens=1).usage.prompt_tokens
        for key in (None, "reasoning", "reasoning_content")
    }
    # Reasoning between tool calls is kept in the prompt, under either spelling.
    assert counts["reasoning"] == counts["reasoning_content"] > counts[None]


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_bad_request_names_the_param(client, kwargs, param):
    body = {"messages": USER, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, **body)
    assert info.value.status_code == 400
    assert info.value.param == param, info.value.message
    assert info.value.type == "invalid_request_error"


def test_grpc_and_http_refuse_the_same_field(cluster, client):
    """One conversion layer: the same bad value is refused naming the same field."""
    with pytest.raises(openai.BadRequestError) as http_err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"min_p": 2})
    with TandemClient(cluster[0].target, api_key=API_KEY) as c:
        with pytest.raises(grpc.RpcError) as grpc_err:
            list(c.generate("x", max_tokens=4, min_p=2.0))
    assert grpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(grpc_err.value.trailing_metadata())[FIELD_METADATA_KEY] == "min_p"
    assert http_err.value.param == "min_p"


def test_api_key_and_unknown_model(cluster):
    base = cluster[1]
    for key in ("wrong-key", API_KEY + "x"):
        with openai.OpenAI(base_url=base, api_key=key, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert (
        httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": "x"}).status_code == 401
    )
    # Health needs no key (probes carry none).
    assert httpx.get(base.removesuffix("/v1") + "/health").json() == {"status": "SERVING"}
    with openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=0) as c:
        with pytest.raises(openai.NotFoundError) as info:
            c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
        assert info.value.param == "model"


# ------------------------------------------------------------------ completions


def test_completions_equal_the_engine(client, reference):
    tok = reference.tokenizer
    prompt = "The quick brown fox jumps over the lazy dog."
    expected = reference.generate(
        [tok.encode(prompt)], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    )[0]
    extra = {"extra_body": {"ignore_eos": True}}
    for given in (prompt, tok.encode(prompt)):
        raw = client.completions.with_raw_response.create(
            model=MODEL, prompt=given, max_tokens=12, temperature=0, **extra
        )
        done = strict(Completion, raw.http_response.json())
        assert done.choices[0].text == expected.text
        assert done.choices[0].finish_reason == "length"
        assert done.usage.prompt_tokens == len(tok.encode(prompt))
    chunks = [
        strict(Completion, _finished(c.to_dict()))
        for c in client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
    ]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def _finished(chunk: dict) -> dict:
    """OpenAI streams completion chunks with finish_reason null until the last, though
    the client's Completion type (used for chunks too) does not allow null there."""
    choices = [{**c, "finish_reason": c.get("finish_reason") or "stop"} for c in chunk["choices"]]
    return {**chunk, "choices": choices}


def test_completion_logprobs(client):
    done = client.completions.create(
        model=MODEL,
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0.0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == done.choices[0].text


# -------------------------------------------------------------------- responses


def test_responses_plain_and_streamed(client):
    kwargs = dict(
        model=MODEL,
        input=[{"role": "user", "content": "Say hello"}],
        instructions="Be brief.",
        reasoning={"effort": "low"},
        max_output_tokens=16,
        temperature=0,
    )
    raw = client.responses.with_raw_response.create(**kwargs)
    plain = strict(Response, raw.http_response.json())
    assert plain.object == "response" and plain.status in ("completed", "incomplete")
    assert plain.output and plain.usage.output_tokens <= 16
    assert plain.usage.input_tokens_details.cached_tokens >= 0
    events = [
        strict(ResponseStreamEvent, e) for e in client.responses.create(stream=True, **kwargs)
    ]
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response

    # Streamed or not, the same greedy turn: the same items with the same texts.
    def texts(r: Response) -> list[tuple[str, str]]:
        out = []
        for item in r.output:
            if item.type == "message":
                out.append(("message", "".join(p.text for p in item.content)))
            elif item.type == "reasoning":
                out.append(("reasoning", "".join(p.text for p in item.content or ())))
            else:
                out.append((item.type, getattr(item, "arguments", "")))
        return out

    assert texts(final) == texts(plain)
    # The deltas add up to the items.
    added = [e for e in events if e.type == "response.output_item.added"]
    assert len(added) == len(final.output)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "".join(t for kind, t in texts(final) if kind == "message")


def test_responses_function_call_items(client):
    tool = {k: v for k, v in TOOLS[0]["function"].items()} | {"type": "function"}
    plain = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "c1", "output": '{"sunny": true}'},
        ],
        tools=[tool],
        max_output_tokens=8,
        temperature=0,
    )
    strict(Response, plain)
    assert plain.tools[0].name == "get_weather"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=MODEL, input="x", previous_response_id="resp_1", max_output_tokens=2
        )
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="x", max_output_tokens=0)
    assert info.value.param == "max_output_tokens"


# -------------------------------------------------------------------- disconnect


def _worker_metrics(running, role: str) -> list[dict]:
    name = PREFILL if role == "prefill" else DECODE
    handle = serve.get_deployment_handle(name, app_name=running.app)
    return [
        json.loads(handle.metrics.remote(tandem_replica=rid).result())
        for rid in running.replicas(role)
    ]


def test_client_disconnect_aborts_on_every_worker(cluster):
    running, base = cluster
    # Longer than the local-prefill threshold: the prefill worker computes the prompt.
    prompt = " ".join(["tandem"] * 40)
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": 350,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def generated() -> float:
        return sum(m["generated_tokens"] for m in _worker_metrics(running, "decode"))

    before = generated()
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/completions", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert any(m["running"] > 0 for m in _worker_metrics(running, "decode"))
        # Leaving the block closed the connection mid-stream.
    wait_for(
        lambda: all(
            m["running"] == 0 and m["waiting"] == 0 and m["kv_usage"] == 0.0
            for role in ("prefill", "decode")
            for m in _worker_metrics(running, role)
        ),
        30,
        "the aborted request to leave every worker",
    )
    # Cut short: a request run to its end would have generated all of its max_tokens.
    assert generated() - before < body["max_tokens"] - 1


# ----------------------------------------------------------------------- README


def _readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### The OpenAI-compatible HTTP API\n", 1)[1]
    section = re.split(r"\n#{2,3} ", section, maxsplit=1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_readme_examples_run(cluster):
    base = cluster[1]
    port = base.split(":")[2].split("/")[0]
    (curl,) = _readme_blocks("sh")
    (python,) = _readme_blocks("python")
    env = {**os.environ, "TANDEM_API_KEY": API_KEY}

    def here(code: str) -> str:
        assert "127.0.0.1:8000" in code
        return code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")

    out = subprocess.run(
        ["bash", "-c", here(curl)], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    answer = strict(ChatCompletion, json.loads(out.stdout))
    assert answer.model == MODEL and answer.choices[0].message.role == "assistant"
    out = subprocess.run(
        [str(REPO / ".venv/bin/python"), "-c", here(python)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") >= 2


# ------------------------------------------------------ in-process HTTP (faults)


@pytest.fixture()
def faulty(tiny_model_dir):
    loop_thread = EventLoopThread()
    backend, llm, hooks = new_backend(
        tiny_model_dir, model_id=MODEL, max_waiting_requests=1, health_timeout_s=0.5
    )
    server = HttpServer(loop_thread, backend, HttpConfig(retry_after_s=2))
    try:
        with openai.OpenAI(base_url=server.base, api_key="none", max_retries=0) as c:
            yield c, backend, llm, hooks
    finally:
        hooks.paused.clear()
        hooks.unstick.set()
        server.stop()
        loop_thread.run(backend.close())
        loop_thread.close()


def test_full_queue_is_429_with_retry_after(faulty):
    c, backend, llm, hooks = faulty
    hooks.paused.set()  # admitted requests wait for the engine without being scheduled
    first: list = []
    reader = threading.Thread(
        target=lambda: first.append(
            c.completions.create(model=MODEL, prompt="first", max_tokens=3, timeout=60)
        )
    )
    reader.start()
    wait_for(lambda: backend.num_waiting == 1, 10, "the first request to wait")
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "2"
    hooks.paused.clear()
    reader.join(30)
    assert first[0].usage.completion_tokens == 3
    assert backend.num_waiting == 0


def test_deadline_header_ends_the_request_and_frees_kv(faulty):
    c, backend, llm, hooks = faulty
    hooks.step_delay_s = 0.03  # 240 tokens take >= 7 s, well past the deadline
    with pytest.raises(openai.InternalServerError) as info:
        c.completions.create(
            model=MODEL,
            prompt="slow",
            max_tokens=240,
            extra_body={"ignore_eos": True},
            extra_headers={"X-Request-Timeout": "1"},
        )
    assert info.value.status_code == 504
    wait_for(lambda: llm.metrics()["kv_usage"] == 0.0, 5, "the KV blocks to be freed")
    assert llm.metrics()["running"] == 0
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_headers={"X-Request-Timeout": "soon"}
        )
    assert info.value.param == "x-request-timeout"


def test_stream_disconnect_frees_kv_in_process(faulty):
    c, backend, llm, hooks = faulty
    hooks.step_delay_s = 0.02
    stream = c.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=150, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    assert llm.metrics()["kv_usage"] > 0
    stream.close()
    wait_for(lambda: llm.metrics()["kv_usage"] == 0.0, 5, "the KV blocks to be freed")
    assert llm.metrics()["running"] == 0 and llm.metrics()["waiting"] == 0


# ------------------------------------------- output shapes, on replayed harmony tokens

REASONING = "Let me think: 2 + 2 = 4."
ANSWER_PIECES = [
    *("<|channel|>", "analysis", "<|message|>", REASONING, "<|end|>"),
    *("<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "It is 4. ✓"),
    "<|return|>",
]
CALL_ARGS = '{"city": "Paris"}'
CALL_PIECES = [
    *("<|channel|>", "analysis", "<|message|>", "Need the weather.", "<|end|>"),
    *("<|start|>", "assistant", "<|channel|>", "commentary", " to=functions.get_weather"),
    *(" ", "<|constrain|>", "json", "<|message|>", CALL_ARGS, "<|call|>"),
]


@pytest.fixture()
def replay(reference):
    """Serve a ReplayBackend (TEST DOUBLE: the output side only) over uvicorn."""
    loop_thread = EventLoopThread()
    servers = []

    def start(pieces: list[str], finish: str = "stop"):
        tok = reference.tokenizer
        backend = ReplayBackend(tok, harmony_ids(tok, pieces), finish, model_id=MODEL)
        server = HttpServer(loop_thread, backend, HttpConfig())
        servers.append(server)
        client = openai.OpenAI(base_url=server.base, api_key="none", max_retries=0)
        return client, backend

    yield start
    for server in servers:
        server.stop()
    loop_thread.close()


def test_replayed_chat_splits_reasoning_from_the_answer(replay):
    client, backend = replay(ANSWER_PIECES)
    done = _chat(client, messages=USER, max_tokens=64)
    message = done.choices[0].message
    assert message.to_dict()["reasoning"] == REASONING
    assert message.content == "It is 4. ✓" and message.tool_calls is None
    assert done.choices[0].finish_reason == "stop"
    chunks = [
        strict(ChatCompletionChunk, c)
        for c in client.chat.completions.create(
            model=MODEL, messages=USER, max_tokens=64, stream=True
        )
    ]
    deltas = [c.choices[0].delta.to_dict() for c in chunks if c.choices]
    assert "".join(d.get("reasoning", "") for d in deltas) == REASONING
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4. ✓"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The request the backend ran: a chat turn stops on <|return|> and <|call|> only.
    tok = backend.tokenizer
    stops = set(backend.requests[0].params.stop_token_ids)
    assert {tok.special.return_, tok.special.call} <= stops and tok.special.end not in stops


def test_replayed_chat_tool_call_plain_and_streamed(replay):
    client, _ = replay(CALL_PIECES)
    done = _chat(client, messages=USER, tools=TOOLS, max_tokens=64)
    (call,) = done.choices[0].message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == (
        "function",
        "get_weather",
        CALL_ARGS,
    )
    assert done.choices[0].finish_reason == "tool_calls"
    assert done.choices[0].message.content is None
    chunks = [
        strict(ChatCompletionChunk, c)
        for c in client.chat.completions.create(
            model=MODEL, messages=USER, tools=TOOLS, max_tokens=64, stream=True
        )
    ]
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or ())]
    first, rest = calls[0], calls[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert first.id.startswith("call_") and rest
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert "".join(d.function.arguments for d in rest) == CALL_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_replayed_forced_call_prompt_ends_in_its_header(replay):
    client, backend = replay([CALL_ARGS, "<|call|>"])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    done = _chat(client, messages=USER, tools=TOOLS, tool_choice=choice, max_tokens=64)
    (call,) = done.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", CALL_ARGS)
    assert done.choices[0].finish_reason == "tool_calls"
    tok = backend.tokenizer
    tail = harmony_ids(
        tok,
        [
            "<|start|>",
            "assistant",
            "<|channel|>",
            "commentary to=functions.get_weather ",
            "<|constrain|>",
            "json",
            "<|message|>",
        ],
    )
    prompt = list(backend.requests[0].prompt_token_ids)
    assert prompt[-len(tail) :] == tail


def test_replayed_responses_items_and_events(replay):
    client, _ = replay(CALL_PIECES)
    plain = strict(
        Response,
        client.responses.with_raw_response.create(
            model=MODEL,
            input="Weather in Paris?",
            tools=[TOOLS[0]["function"] | {"type": "function"}],
            max_output_tokens=64,
        ).http_response.json(),
    )
    assert [item.type for item in plain.output] == ["reasoning", "function_call"]
    reasoning, call = plain.output
    assert reasoning.content[0].text == "Need the weather."
    assert (call.name, call.arguments, call.status) == ("get_weather", CALL_ARGS, "completed")
    assert call.call_id.startswith("call_") and plain.status == "completed"

    client, _ = replay(ANSWER_PIECES)
    events = [
        strict(ResponseStreamEvent, e)
        for e in client.responses.create(
            model=MODEL, input="2+2?", max_output_tokens=64, stream=True
        )
    ]
    kinds = [e.type for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    item = [
        "response.output_item.added",
        "response.content_part.added",
        "DELTA",
        "DONE",
        "response.content_part.done",
        "response.output_item.done",
    ]

    def expect(kind: str) -> list[str]:
        return [
            {"DELTA": f"response.{kind}.delta", "DONE": f"response.{kind}.done"}.get(k, k)
            for k in item
        ]

    assert squeezed == [
        "response.created",
        "response.in_progress",
        *expect("reasoning_text"),
        *expect("output_text"),
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == (
        REASONING
    )
    final = events[-1].response
    assert final.output_text == "It is 4. ✓"
    assert [i.status for i in final.output if i.type == "message"] == ["completed"]


def test_replayed_response_cut_short_is_incomplete(replay):
    client, _ = replay(ANSWER_PIECES[:-1], finish="length")
    done = client.responses.create(model=MODEL, input="2+2?", max_output_tokens=64)
    assert done.status == "incomplete"
    assert done.incomplete_details.reason == "max_output_tokens"
    assert done.output[-1].type == "message" and done.output[-1].status == "incomplete"


def test_serve_refuses_a_taken_http_port():
    """`tandem serve --http-port` on a port another socket holds exits at once (before
    Ray or Redis start) with one line naming the port."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tandem.cluster.cli",
                "serve",
                "--grpc-port",
                str(free_port()),
                "--http-port",
                str(taken),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("tandem serve:")]
    assert ours == [f"tandem serve: HTTP port {taken} on 127.0.0.1 is already in use"], done.stderr


def test_http_port_override_turns_the_proxy_on_where_grpc_listens():
    default = load_app_config(None)
    assert not default.http_enabled and default.route_prefix is None
    config = load_app_config(None, ConfigOverrides(http_port=8123))
    assert config.http_enabled and config.route_prefix == "/"
    assert config.serve.proxy_location == "EveryNode"
    # Serve's own default host is 0.0.0.0; the API stays on the gRPC host (loopback).
    assert (config.serve.http_options.host, config.serve.http_options.port) == (
        "127.0.0.1",
        8123,
    )
    assert config.http_url == "http://127.0.0.1:8123/v1"
    remote = load_app_config(None, ConfigOverrides(http_port=8123, grpc_host="0.0.0.0"))
    assert remote.serve.http_options.host == "0.0.0.0"
    assert remote.http_url == "http://127.0.0.1:8123/v1"


def test_engine_failure_mid_stream_is_an_error_event(faulty):
    """After the 200 went out, a failure can only be a last event: OpenAI's error object
    for chat (the client raises APIError), an "error" event for responses."""
    c, backend, llm, hooks = faulty
    hooks.step_delay_s = 0.02
    stream = c.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=100, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    hooks.fail.set()
    with pytest.raises(openai.APIError) as info:
        list(chunks)
    assert "unavailable" in info.value.message


def test_engine_failure_mid_response_stream_is_an_error_event(faulty):
    c, backend, llm, hooks = faulty
    hooks.step_delay_s = 0.02
    stream = iter(
        c.responses.create(
            model=MODEL,
            input="x",
            max_output_tokens=100,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    first = [strict(ResponseStreamEvent, next(stream)) for _ in range(2)]
    hooks.fail.set()
    rest = [strict(ResponseStreamEvent, e) for e in stream]
    events = first + rest
    assert events[-1].type == "error" and "unavailable" in events[-1].message
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_replayed_required_tool_choice_lets_the_model_name_the_function(replay):
    client, backend = replay(
        ["get_weather", " ", "<|constrain|>", "json", "<|message|>", CALL_ARGS, "<|call|>"]
    )
    done = _chat(client, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=64)
    (call,) = done.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_weather", CALL_ARGS)
    tok = backend.tokenizer
    tail = harmony_ids(tok, ["<|start|>", "assistant", "<|channel|>", "commentary to=functions."])
    assert list(backend.requests[0].prompt_token_ids)[-len(tail) :] == tail
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")
    assert info.value.param == "tool_choice"


def test_replayed_responses_named_tool_choice(replay):
    client, backend = replay([CALL_ARGS, "<|call|>"])
    tool = TOOLS[0]["function"] | {"type": "function"}
    done = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[tool],
        max_output_tokens=64,
        tool_choice={"type": "function", "name": "get_weather"},
    )
    strict(Response, done)
    (call,) = done.output
    assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", CALL_ARGS)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model=MODEL, input="x", tools=[tool], tool_choice={"type": "function", "name": "no"}
        )
    assert info.value.param == "tool_choice"
