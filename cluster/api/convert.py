"""Protobuf <-> the engine's types: requests in, stream chunks out.

The checks and conversions themselves live in the layer both fronts share (prepare.py
for requests, chat_stream.py for chat outputs); this module only maps protobuf onto it,
naming offending fields in proto terms ("prompt", "messages[1]",
"tools[0].parameters_json").
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.cluster.api import limits as input_limits
from tandem.cluster.api import prepare
from tandem.cluster.api.backend import GenerationDelta, InvalidRequestError, ModelCard
from tandem.cluster.api.chat_stream import ChatSplitter
from tandem.cluster.api.gen import tandem_pb2 as pb
from tandem.cluster.api.limits import DEFAULT_LIMITS, RequestLimits
from tandem.cluster.api.prepare import max_prompt_bytes, request_id
from tandem.workers.engine.outputs import TokenLogprob
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.text.harmony import Conversation
from tandem.workers.text.tokenizer import Tokenizer

__all__ = [
    "ChatStreamSplitter",
    "chat_sampling_params",
    "conversation",
    "generate_chunk",
    "max_prompt_bytes",
    "model_info",
    "prompt_token_ids",
    "request_id",
    "sampling_params",
]

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}
REASONING_EFFORTS = {
    pb.REASONING_EFFORT_UNSPECIFIED: "medium",
    pb.REASONING_EFFORT_LOW: "low",
    pb.REASONING_EFFORT_MEDIUM: "medium",
    pb.REASONING_EFFORT_HIGH: "high",
}

# ------------------------------------------------------------------------ requests


def _given(msg: pb.SamplingParameters) -> dict[str, object]:
    """The optional proto fields the client set (unset ones keep SamplingParams' defaults)."""
    return {name: getattr(msg, name) for name in prepare.SAMPLING_FIELDS if msg.HasField(name)}


def sampling_params(
    msg: pb.SamplingParameters, extra_stop_token_ids: Sequence[int] = ()
) -> SamplingParams:
    """Raises SamplingParamsError naming the field."""
    return prepare.sampling_params(_given(msg), msg.stop, msg.stop_token_ids, extra_stop_token_ids)


def chat_sampling_params(msg: pb.SamplingParameters, tokenizer: Tokenizer) -> SamplingParams:
    """A chat turn also ends on <|return|> and <|call|> (never on <|end|>)."""
    return prepare.chat_sampling_params(_given(msg), tokenizer, msg.stop, msg.stop_token_ids)


def prompt_token_ids(
    request: pb.GenerateRequest,
    tokenizer: Tokenizer,
    model: ModelCard,
    text_limit: int,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> list[int]:
    """Text is encoded with special tokens disallowed; ids must lie in the vocabulary.
    `text_limit`: max_prompt_bytes(). May take a while on long text: run it off the loop."""
    input_limits.check_request_bytes(limits, request.ByteSize())
    which = request.WhichOneof("prompt")
    if which == "text":
        return prepare.text_prompt(request.text, tokenizer, text_limit)
    if which == "token_ids":
        return prepare.token_prompt(request.token_ids.ids, model)
    raise InvalidRequestError("prompt", "prompt: give text or token_ids")


def _tool_bytes(t: pb.Tool) -> int:
    return len(t.name.encode()) + len(t.description.encode()) + len(t.parameters_json.encode())


def conversation(
    request: pb.ChatRequest, text_limit: int, limits: RequestLimits = DEFAULT_LIMITS
) -> Conversation:
    """The harmony conversation of a ChatRequest; empty proto strings mean "not given".
    Sizes are checked (limits.py) before any message or tool is converted."""
    input_limits.check_chat_sizes(
        limits,
        request_bytes=request.ByteSize,
        messages=request.messages,
        tools=request.tools,
        tool_bytes=_tool_bytes,
    )
    messages = [
        prepare.message(
            f"messages[{i}]",
            role=m.role,
            content=m.content,
            channel=m.channel or None,
            recipient=m.recipient or None,
            name=m.name or None,
        )
        for i, m in enumerate(request.messages)
    ]
    tools = [
        prepare.tool(
            f"tools[{i}]", t.name, t.description, t.parameters_json, "parameters_json", limits
        )
        for i, t in enumerate(request.tools)
    ]
    effort = REASONING_EFFORTS.get(request.reasoning_effort)
    if effort is None:
        raise InvalidRequestError(
            "reasoning_effort", f"reasoning_effort: unknown value {request.reasoning_effort}"
        )
    return prepare.conversation(
        messages,
        tools=tools,
        reasoning_effort=effort,
        instructions=request.instructions or None,
        text_limit=text_limit,
    )


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
    """Turns the token deltas of a harmony completion into ChatChunks (the split itself:
    chat_stream.ChatSplitter): analysis text to reasoning_delta, final (and preamble)
    text to content_delta, finished tool calls to tool_calls. A turn that ends in
    <|call|> finishes with FINISH_REASON_TOOL_CALLS."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._splitter = ChatSplitter(tokenizer)

    def chunk(self, delta: GenerationDelta) -> pb.ChatChunk:
        d = self._splitter.split(delta)
        out = delta.output
        chunk = pb.ChatChunk(
            request_id=out.request_id,
            reasoning_delta=d.reasoning,
            content_delta=d.content,
            tool_calls=[
                pb.ToolCall(index=c.index, name=c.name, arguments=c.arguments) for c in d.tool_calls
            ],
            token_ids=out.token_ids,
        )
        if d.finish_reason is not None:
            chunk.finish_reason = FINISH_REASONS.get(d.finish_reason, pb.FINISH_REASON_STOP)
            _fill_final(chunk, delta)
        return chunk


def model_info(card: ModelCard) -> pb.ModelInfo:
    return pb.ModelInfo(id=card.id, max_model_len=card.max_model_len, vocab_size=card.vocab_size)
