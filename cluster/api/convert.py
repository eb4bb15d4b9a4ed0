"""Protobuf <-> the engine's types: requests in, stream chunks out.

Everything a client sends is checked here (or by SamplingParams, whose errors already
name their field) before a backend sees it; errors are InvalidRequestError naming the
offending field in proto terms ("prompt", "messages[1]", "tools[0].parameters_json").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace

from tandem.cluster.api.backend import GenerationDelta, InvalidRequestError, ModelCard
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.workers.engine.outputs import TokenLogprob
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.text.harmony import (
    ContentDelta,
    Conversation,
    HarmonyStreamParser,
    Message,
    MessageEnd,
    ReasoningDelta,
    ToolCall,
    ToolSpec,
    chat_stop_token_ids,
)
from tandem.workers.text.tokenizer import Tokenizer

MAX_REQUEST_ID_CHARS = 128
# Proto fields that map one to one onto SamplingParams fields of the same name, when set.
_OPTIONAL_SAMPLING_FIELDS = (
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
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
REASONING_EFFORTS = {
    pb.REASONING_EFFORT_UNSPECIFIED: "medium",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
}

# ------------------------------------------------------------------------ requests


def sampling_params(
    msg: pb.SamplingParameters, extra_stop_token_ids: Sequence[int] = ()
) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; raises SamplingParamsError."""
    kwargs: dict[str, object] = {
        name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)
    }
    params = SamplingParams(
        stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids), **kwargs
    )
    if extra_stop_token_ids:
        ids = params.stop_token_ids + tuple(
            t for t in extra_stop_token_ids if t not in params.stop_token_ids
        )
        params = replace(params, stop_token_ids=ids)
    return params


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


def max_prompt_bytes(tokenizer: Tokenizer, model: ModelCard) -> int:
    """UTF-8 size above which a text cannot fit the context window: no token covers more
    bytes than the longest one in the vocabulary. Checked before encoding, so a huge
    prompt is refused at once instead of occupying a thread for seconds first."""
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size))
    return model.max_model_len * max(longest, 1)


def _check_text_size(field: str, size: int, limit: int) -> None:
    if size > limit:
        raise InvalidRequestError(
            field,
            f"{field} is {size} bytes; no text over {limit} bytes fits the context window",
        )


def prompt_token_ids(
    request: pb.GenerateRequest, tokenizer: Tokenizer, model: ModelCard, text_limit: int
) -> list[int]:
    """Text is encoded with special tokens disallowed; ids must lie in the vocabulary.
    `text_limit`: max_prompt_bytes(). May take a while on long text: run it off the loop."""
    which = request.WhichOneof("prompt")
    if which == "text":
        _check_text_size("prompt", len(request.text.encode("utf-8")), text_limit)
        ids = tokenizer.encode(request.text)
    elif which == "token_ids":
        ids = list(request.token_ids.ids)
        for i, t in enumerate(ids):
            if not 0 <= t < model.vocab_size:
                raise InvalidRequestError(
                    "prompt",
                    f"prompt: token_ids[{i}] = {t} is outside the vocabulary "
                    f"[0, {model.vocab_size})",
                )
    else:
        raise InvalidRequestError("prompt", "prompt: give text or token_ids")
    if not ids:
        raise InvalidRequestError("prompt", "prompt must hold at least one token")
    return ids


def conversation(request: pb.ChatRequest, text_limit: int) -> Conversation:
    """The harmony conversation of a ChatRequest; empty proto strings mean "not given".
    `text_limit`: max_prompt_bytes(), applied to the text rendered verbatim (contents
    and instructions; tool schemas are rewritten as TypeScript, often shorter)."""
    if not request.messages:
        raise InvalidRequestError("messages", "messages must hold at least one message")
    verbatim = sum(len(m.content.encode("utf-8")) for m in request.messages)
    _check_text_size("messages", verbatim + len(request.instructions.encode("utf-8")), text_limit)
    messages = []
    for i, m in enumerate(request.messages):
        try:
            messages.append(
                Message(
                    role=m.role,
                    content=m.content,
                    channel=m.channel or None,
                    recipient=m.recipient or None,
                    name=m.name or None,
                )
            )
        except ValueError as err:
            raise InvalidRequestError(f"messages[{i}]", f"messages[{i}]: {err}") from err
    tools = []
    for i, t in enumerate(request.tools):
        parameters = None
        if t.parameters_json:
            where = f"tools[{i}].parameters_json"
            try:
                parameters = json.loads(t.parameters_json)
            except json.JSONDecodeError as err:
                raise InvalidRequestError(where, f"{where} is not valid JSON: {err}") from err
            if not isinstance(parameters, dict):
                raise InvalidRequestError(where, f"{where} must be a JSON object")
        try:
            tools.append(ToolSpec(name=t.name, description=t.description, parameters=parameters))
        except ValueError as err:
            raise InvalidRequestError(f"tools[{i}]", f"tools[{i}]: {err}") from err
    effort = REASONING_EFFORTS.get(request.reasoning_effort)
    if effort is None:
        raise InvalidRequestError(
            "reasoning_effort", f"reasoning_effort: unknown value {request.reasoning_effort}"
        )
    try:
        return Conversation(
            messages=tuple(messages),
            reasoning_effort=effort,
            tools=tuple(tools),
            instructions=request.instructions or None,
        )
    except ValueError as err:
        # The one cross-message rule left: tool names must be distinct.
        raise InvalidRequestError("tools", f"tools: {err}") from err


def chat_sampling_params(msg: pb.SamplingParameters, tokenizer: Tokenizer) -> SamplingParams:
    """A chat turn also ends on <|return|> and <|call|> (never on <|end|>)."""
    return sampling_params(msg, extra_stop_token_ids=chat_stop_token_ids(tokenizer))


# -------------------------------------------------------------------------- chunks


def _logprobs(items: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in items
    ]


def _fill_final(chunk: pb.GenerateChunk | pb.ChatChunk, delta: GenerationDelta) -> None:
    """Usage, timings and served_by: set on the last chunk of a stream only."""
    out = delta.output
    chunk.usage.CopyFrom(
        pb.Usage(
            prompt_tokens=out.usage.prompt_tokens,
            cached_tokens=out.usage.cached_tokens,
            completion_tokens=out.usage.completion_tokens,
        )
    )
    if out.timings is not None:
        t = out.timings
        chunk.timings.CopyFrom(
            pb.Timings(
                queue_s=t.queue_s,
                prefill_s=t.prefill_s,
                kv_transfer_s=delta.kv_transfer_s,
                ttft_s=t.ttft_s,
                per_token_s=t.per_token_s,
            )
        )
    chunk.served_by.CopyFrom(
        pb.ServedBy(
            prefill_replica=delta.served_by.prefill_replica,
            decode_replica=delta.served_by.decode_replica,
        )
    )


def generate_chunk(delta: GenerationDelta) -> pb.GenerateChunk:
    out = delta.output
    chunk = pb.GenerateChunk(
        request_id=out.request_id,
        token_ids=out.token_ids,
        text_delta=out.text_delta,
        logprobs=_logprobs(out.logprobs),
    )
    if out.finished:
        chunk.finish_reason = FINISH_REASONS.get(out.finish_reason or "", pb.FINISH_REASON_STOP)
        _fill_final(chunk, delta)
    return chunk


class ChatStreamSplitter:
    """Turns the token deltas of a harmony completion into ChatChunks: analysis text to
    reasoning_delta, final (and preamble) text to content_delta, finished tool calls to
    tool_calls. A turn that ends in <|call|> finishes with FINISH_REASON_TOOL_CALLS."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._parser = HarmonyStreamParser(tokenizer, role="assistant")

    def chunk(self, delta: GenerationDelta) -> pb.ChatChunk:
        out = delta.output
        events = [event for t in out.token_ids for event in self._parser.feed(t)]
        if out.finished:
            events += self._parser.finish()
        chunk = pb.ChatChunk(
            request_id=out.request_id,
            reasoning_delta="".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            content_delta="".join(e.text for e in events if isinstance(e, ContentDelta)),
            tool_calls=[
                pb.ToolCall(index=e.index, name=e.name, arguments=e.arguments)
                for e in events
                if isinstance(e, ToolCall)
            ],
            token_ids=out.token_ids,
        )
        if out.finished:
            called = any(isinstance(e, MessageEnd) and e.terminator == "call" for e in events)
            if out.finish_reason == "stop" and called:
                chunk.finish_reason = pb.FINISH_REASON_TOOL_CALLS
            else:
                chunk.finish_reason = FINISH_REASONS.get(
                    out.finish_reason or "", pb.FINISH_REASON_STOP
                )
            _fill_final(chunk, delta)
        return chunk


def model_info(card: ModelCard) -> pb.ModelInfo:
    return pb.ModelInfo(id=card.id, max_model_len=card.max_model_len, vocab_size=card.vocab_size)
