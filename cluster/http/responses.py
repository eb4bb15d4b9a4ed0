"""POST /v1/responses: the Responses API as OpenAI's gpt-oss reference server shapes it
(gpt_oss/responses_api): one output item per harmony message of the turn.

    harmony message                         output item
    analysis                           ->   reasoning {content: [reasoning_text]}
    commentary to=functions.NAME       ->   function_call {name, arguments, call_id}
    final (or commentary to the user)  ->   message {content: [output_text]}

Streamed, each item is response.output_item.added, its deltas (reasoning_text.delta,
output_text.delta inside a content part, function_call_arguments.delta), their .done
events and response.output_item.done, between response.created / in_progress and
response.completed (response.incomplete when max_output_tokens cut it short). Nothing
is stored: previous_response_id is refused; hand the items back in `input` instead.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tandem.cluster.api import prepare
from tandem.cluster.api.backend import InvalidRequestError
from tandem.cluster.api.chat_stream import ChatDelta
from tandem.cluster.http.schema import ResponsesRequest, given_sampling
from tandem.workers.engine.outputs import Usage
from tandem.workers.text.harmony import (
    ContentDelta,
    Conversation,
    Message,
    MessageEnd,
    MessageStart,
    ReasoningDelta,
    ToolCallDelta,
)
from tandem.workers.text.tokenizer import Tokenizer


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(where, f"{where}: must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text", "reasoning_text"):
            raise InvalidRequestError(
                f"{where}[{j}].type", f"{where}[{j}].type: only text parts are supported"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{where}[{j}].text", f"{where}[{j}].text must be a string")
        texts.append(text)
    return "".join(texts)


def conversation(body: ResponsesRequest, text_limit: int) -> Conversation:
    if body.previous_response_id is not None:
        raise InvalidRequestError(
            "previous_response_id",
            "previous_response_id: this server stores no responses; send the earlier "
            "items in `input`",
        )
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type != "text":
        raise InvalidRequestError(
            "text.format",
            f"text.format: {fmt.type!r} needs constrained decoding, which this server does not do",
        )
    instructions = [body.instructions] if body.instructions else []
    messages: list[Message] = []
    names: dict[str, str] = {}
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _content_text(item.get("content"), f"{where}.content")
            if role in ("system", "developer"):
                instructions.append(text)
            elif role in ("user", "assistant"):
                channel = "final" if role == "assistant" else None
                messages.append(prepare.message(where, role=role, content=text, channel=channel))
            else:
                raise InvalidRequestError(f"{where}.role", f"{where}.role: unknown role {role!r}")
        elif kind == "reasoning":
            text = _content_text(item.get("content") or [], f"{where}.content")
            if text:
                messages.append(
                    prepare.message(where, role="assistant", channel="analysis", content=text)
                )
        elif kind == "function_call":
            name, call_id = item.get("name"), item.get("call_id", "")
            if not isinstance(name, str):
                raise InvalidRequestError(f"{where}.name", f"{where}.name must be a string")
            names[str(call_id)] = name
            messages.append(
                prepare.message(
                    where,
                    role="assistant",
                    channel="commentary",
                    recipient=f"functions.{name}",
                    content=str(item.get("arguments", "")),
                    content_type="json",
                )
            )
        elif kind == "function_call_output":
            name = names.get(str(item.get("call_id", "")))
            if name is None:
                raise InvalidRequestError(
                    f"{where}.call_id", f"{where}.call_id: names no earlier function_call"
                )
            output = item.get("output", "")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            messages.append(prepare.message(where, role="tool", name=name, content=text))
        else:
            raise InvalidRequestError(
                f"{where}.type", f"{where}.type: {kind!r} items are not supported"
            )
    tools = []
    for i, t in enumerate(body.tools or ()):
        if t.type != "function" or not t.name:
            raise InvalidRequestError(
                f"tools[{i}].type", f"tools[{i}].type: only named function tools are supported"
            )
        tools.append(prepare.tool(f"tools[{i}]", t.name, t.description or "", t.parameters))
    if body.tool_choice == "none":
        tools = []
    effort = body.reasoning.effort if body.reasoning and body.reasoning.effort else "medium"
    return prepare.conversation(
        messages,
        tools=tools,
        reasoning_effort=effort,
        instructions="\n\n".join(instructions) or None,
        text_limit=text_limit,
        messages_field="input",
    )


def forced_call(body: ResponsesRequest, tokenizer: Tokenizer) -> prepare.ForcedCall | None:
    """tool_choice "required" or {"type": "function", "name": ...}: the turn starts as a
    call (prepare.ForcedCall); "auto", "none" or absent: None."""
    choice = body.tool_choice
    if choice in (None, "auto", "none"):
        return None
    names = {t.name for t in body.tools or ()}
    if choice == "required":
        if not names:
            raise InvalidRequestError("tool_choice", "tool_choice: 'required' needs tools")
        return prepare.forced_call(None, tokenizer)
    name = choice.get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and name):
        raise InvalidRequestError(
            "tool_choice",
            "tool_choice: give 'auto', 'none', 'required' or a function by name",
        )
    if name not in names:
        raise InvalidRequestError(
            "tool_choice", f"tool_choice: {name!r} is not one of the request's tools"
        )
    return prepare.forced_call(name, tokenizer)


def sampling(body: ResponsesRequest) -> dict[str, Any]:
    given = given_sampling(body)
    if body.max_output_tokens is not None:
        given["max_tokens"] = body.max_output_tokens
    return given


def param_name(field_name: str) -> str:
    return "max_output_tokens" if field_name == "max_tokens" else field_name


def usage_json(usage: Usage | None, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class ResponseBuilder:
    """Follows the turn's harmony events, building output items; `events()` returns the
    stream events each delta adds (a non-streamed call ignores them)."""

    def __init__(self, body: ResponsesRequest, model: str) -> None:
        self.id = _new_id("resp")
        self._body = body
        self._model = model
        self._created = time.time()
        self.output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._seq = 0
        self.status = "in_progress"
        self.usage: Usage | None = None

    # ----------------------------------------------------------------- objects

    def response(self) -> dict[str, Any]:
        b = self._body
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self._created,
            "model": self._model,
            "status": self.status,
            "output": self.output,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "parallel_tool_calls": bool(b.parallel_tool_calls),
            "tool_choice": b.tool_choice if b.tool_choice is not None else "auto",
            "tools": [
                {
                    "type": "function",
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                    "strict": t.strict,
                }
                for t in b.tools or ()
            ],
            "temperature": b.temperature,
            "top_p": b.top_p,
            "reasoning": {"effort": b.reasoning.effort if b.reasoning else None},
            "text": {"format": {"type": "text"}},
            "usage": usage_json(self.usage),
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start_events(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    # ------------------------------------------------------------------ events

    def add(self, d: ChatDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        # A message still open when the turn stops was cut short (max_output_tokens): the
        # parser closes it without a terminator.
        cut = d.finish_reason in ("length", "abort")
        for e in d.events:
            if isinstance(e, MessageStart):
                events += self._start(e)
            elif isinstance(e, (ReasoningDelta, ContentDelta, ToolCallDelta)):
                events += self._delta(e.arguments if isinstance(e, ToolCallDelta) else e.text)
            elif isinstance(e, MessageEnd):
                events += self._end(cut_short=cut and e.terminator is None)
        if d.finish_reason is not None:
            events += self._end(cut_short=cut)
            self.usage = d.delta.output.usage
            self.status = "incomplete" if d.finish_reason == "length" else "completed"
            kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
            events.append(self._event(kind, response=self.response()))
        return events

    def _start(self, e: MessageStart) -> list[dict[str, Any]]:
        events = self._end()
        if e.role != "assistant":
            return events  # another role's text is not for the client (the parser drops it)
        index = len(self.output)
        if e.channel == "analysis":
            item: dict[str, Any] = {
                "type": "reasoning",
                "id": _new_id("rs"),
                "summary": [],
                "content": [],
            }
            part: dict[str, Any] | None = {"type": "reasoning_text", "text": ""}
        elif e.recipient is not None and e.recipient.startswith("functions."):
            item = {
                "type": "function_call",
                "id": _new_id("fc"),
                "call_id": _new_id("call"),
                "name": e.recipient.removeprefix("functions."),
                "arguments": "",
                "status": "in_progress",
            }
            part = None
        else:
            item = {
                "type": "message",
                "id": _new_id("msg"),
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._open = {"item": item, "index": index, "part": part}
        self.output.append(item)
        events.append(
            self._event("response.output_item.added", output_index=index, item=dict(item))
        )
        if part is not None:
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        return events

    def _delta(self, text: str) -> list[dict[str, Any]]:
        if self._open is None or not text:
            return []
        item, index, part = self._open["item"], self._open["index"], self._open["part"]
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            item["arguments"] += text
            return [self._event("response.function_call_arguments.delta", delta=text, **where)]
        part["text"] += text
        if item["type"] == "reasoning":
            return [
                self._event("response.reasoning_text.delta", content_index=0, delta=text, **where)
            ]
        return [
            self._event(
                "response.output_text.delta", content_index=0, delta=text, logprobs=[], **where
            )
        ]

    def _end(self, cut_short: bool = False) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        item, index, part = self._open["item"], self._open["index"], self._open["part"]
        self._open = None
        where = {"item_id": item["id"], "output_index": index}
        events = []
        status = "incomplete" if cut_short else "completed"
        if item["type"] == "function_call":
            item["status"] = status
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    arguments=item["arguments"],
                    name=item["name"],
                    **where,
                )
            )
        else:
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            done: dict[str, Any] = {"content_index": 0, "text": part["text"], **where}
            if kind == "output_text":
                done["logprobs"] = []
            events.append(self._event(f"response.{kind}.done", **done))
            events.append(
                self._event("response.content_part.done", content_index=0, part=part, **where)
            )
            item["content"] = [part]
            if item["type"] == "message":
                item["status"] = status
        events.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return events
