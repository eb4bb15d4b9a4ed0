"""POST /v1/chat/completions: OpenAI chat messages in (through prepare.py's harmony
conversation), chat.completion objects or chat.completion.chunk events out (through
chat_stream.py's split of the harmony output).

    messages                 harmony
    system / developer  ->   developer "# Instructions" (joined, in order)
    user                ->   user
    assistant           ->   analysis (its `reasoning` / `reasoning_content`), then
                             final (its content) or one call per tool_calls entry
    tool                ->   tool message authored by the function its tool_call_id named

Reasoning comes back in `reasoning` (message and delta); tool calls stream as OpenAI
streams them: a call's first delta carries its id, type and name with empty arguments,
later ones carry argument text only.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tandem.cluster.api import prepare
from tandem.cluster.api.backend import InvalidRequestError
from tandem.cluster.api.chat_stream import ChatDelta
from tandem.cluster.http.schema import ChatCompletionRequest, ChatMessage, given_sampling
from tandem.workers.engine.outputs import TokenLogprob, Usage
from tandem.workers.engine.sampling_params import SamplingParams
from tandem.workers.text.harmony import Conversation, Message
from tandem.workers.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class PreparedChat:
    conversation: Conversation
    forced: prepare.ForcedCall | None
    sampling: dict[str, Any]
    # SamplingParams fields the client set; max_tokens may be filled in later.
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (the only kind this model reads)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise InvalidRequestError(
                f"{where}.content[{j}].type",
                f"{where}.content[{j}].type: only text parts are supported, got {part.type!r}",
            )
        texts.append(part.text)
    return "".join(texts)


def harmony_messages(messages: list[ChatMessage]) -> tuple[list[Message], str | None]:
    """The conversation's messages and the developer instructions (system and developer
    messages); fields named as the API names them."""
    out: list[Message] = []
    instructions: list[str] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text = _text(m.content, where)
        if m.role in ("system", "developer"):
            instructions.append(text)
        elif m.role == "user":
            out.append(prepare.message(where, role="user", content=text))
        elif m.role == "assistant":
            reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
            if reasoning:
                out.append(
                    prepare.message(where, role="assistant", channel="analysis", content=reasoning)
                )
            if text:
                out.append(prepare.message(where, role="assistant", channel="final", content=text))
            for k, call in enumerate(m.tool_calls or ()):
                call_names[call.id] = call.function.name
                out.append(
                    prepare.message(
                        f"{where}.tool_calls[{k}]",
                        role="assistant",
                        channel="commentary",
                        recipient=f"functions.{call.function.name}",
                        content=call.function.arguments,
                        content_type="json",
                    )
                )
        else:  # tool
            name = call_names.get(m.tool_call_id or "") or m.name
            if not name:
                raise InvalidRequestError(
                    f"{where}.tool_call_id",
                    f"{where}.tool_call_id: names no earlier assistant tool call",
                )
            out.append(prepare.message(where, role="tool", name=name, content=text))
    return out, "\n\n".join(instructions) if instructions else None


def prepare_chat(
    body: ChatCompletionRequest, tokenizer: Tokenizer, text_limit: int
) -> PreparedChat:
    if body.n not in (None, 1):
        raise InvalidRequestError("n", "n: only one choice per request is supported")
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequestError(
            "response_format",
            f"response_format: {body.response_format.type!r} needs constrained decoding, "
            "which this server does not do; ask for JSON in the prompt instead",
        )
    messages, instructions = harmony_messages(body.messages)
    tools = [
        prepare.tool(
            f"tools[{i}].function",
            t.function.name,
            t.function.description or "",
            t.function.parameters,
        )
        for i, t in enumerate(body.tools or ())
    ]
    forced = None
    choice = body.tool_choice
    if choice == "none":
        tools = []  # the model is not told of any tool, so it calls none
    elif choice == "required":
        if not tools:
            raise InvalidRequestError("tool_choice", "tool_choice: 'required' needs tools")
        forced = prepare.forced_call(None, tokenizer)
    elif choice is not None and choice != "auto":
        name = choice.function.name
        if name not in {t.name for t in tools}:
            raise InvalidRequestError(
                "tool_choice", f"tool_choice: {name!r} is not one of the request's tools"
            )
        forced = prepare.forced_call(name, tokenizer)
    conv = prepare.conversation(
        messages,
        tools=tools,
        reasoning_effort=body.reasoning_effort or "medium",
        instructions=instructions,
        text_limit=text_limit,
    )
    sampling = given_sampling(body)
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens)
    )
    if max_tokens is not None:
        sampling["max_tokens"] = max_tokens
    if body.logprobs:
        sampling["logprobs"] = body.top_logprobs or 0
    elif body.top_logprobs is not None:
        raise InvalidRequestError("top_logprobs", "top_logprobs: needs logprobs set to true")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return PreparedChat(conv, forced, sampling, stop, tuple(body.stop_token_ids or ()))


# SamplingParams' field names, as this route's client spelt them.
def param_name(body: ChatCompletionRequest, field_name: str) -> str:
    if field_name == "max_tokens" and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    if field_name == "logprobs":
        return "top_logprobs"
    return field_name


# ------------------------------------------------------------------------ outputs


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def logprobs_json(items: tuple[TokenLogprob, ...], tokenizer: Tokenizer) -> list[dict[str, Any]]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token_id)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "bytes": list(raw),
            "logprob": logprob,
        }

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in items
    ]


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChatAccumulator:
    """Builds the non-streamed chat.completion from the turn's deltas."""

    tokenizer: Tokenizer
    want_logprobs: bool
    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None

    def add(self, d: ChatDelta) -> None:
        self.reasoning.append(d.reasoning)
        self.content.append(d.content)
        for c in d.tool_calls:
            self.calls.append(
                {
                    "id": _call_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
            )
        if self.want_logprobs:
            self.logprobs += logprobs_json(d.delta.output.logprobs, self.tokenizer)
        if d.finish_reason is not None:
            self.finish_reason = _openai_finish(d.finish_reason)
            self.usage = d.delta.output.usage

    def completion(self, rid: str, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) or None,
            "reasoning": "".join(self.reasoning) or None,
        }
        if self.calls:
            message["tool_calls"] = self.calls
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": self.finish_reason,
            "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
        }
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage_json(self.usage) if self.usage else None,
        }


def _openai_finish(reason: str) -> str:
    # "abort" only reaches a client whose request was cut short by the server.
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


class ChatChunker:
    """chat.completion.chunk objects for one streamed turn."""

    def __init__(
        self, rid: str, model: str, tokenizer: Tokenizer, want_logprobs: bool, include_usage: bool
    ) -> None:
        self._rid, self._model, self._tok = rid, model, tokenizer
        self._want_logprobs, self._include_usage = want_logprobs, include_usage
        self._created = int(time.time())
        self._call_ids: dict[int, str] = {}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {
            "id": self._rid,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": choices,
        }
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def first(self) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )

    def chunks(self, d: ChatDelta) -> list[dict[str, Any]]:
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        calls = []
        for c in d.tool_call_deltas:
            if c.index not in self._call_ids:
                self._call_ids[c.index] = _call_id()
                calls.append(
                    {
                        "index": c.index,
                        "id": self._call_ids[c.index],
                        "type": "function",
                        "function": {"name": c.name, "arguments": ""},
                    }
                )
            calls.append({"index": c.index, "function": {"arguments": c.arguments}})
        for c in d.tool_calls:
            if c.index not in self._call_ids:  # a call with empty arguments
                self._call_ids[c.index] = _call_id()
                calls.append(
                    {
                        "index": c.index,
                        "id": self._call_ids[c.index],
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments},
                    }
                )
        if calls:
            delta["tool_calls"] = calls
        out = []
        lps = d.delta.output.logprobs
        if delta or (self._want_logprobs and lps):
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": None}
            if self._want_logprobs:
                choice["logprobs"] = {"content": logprobs_json(lps, self._tok)}
            out.append(self._chunk([choice]))
        if d.finish_reason is not None:
            out.append(
                self._chunk(
                    [{"index": 0, "delta": {}, "finish_reason": _openai_finish(d.finish_reason)}]
                )
            )
            if self._include_usage:
                last = self._chunk([])
                last["usage"] = usage_json(d.delta.output.usage)
                out.append(last)
        return out


def sampling_for(prepared: PreparedChat, tokenizer: Tokenizer) -> SamplingParams:
    return prepare.chat_sampling_params(
        prepared.sampling, tokenizer, prepared.stop, prepared.stop_token_ids
    )
