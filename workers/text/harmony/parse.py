"""Incremental parsing of sampled harmony tokens into typed events.

The prompt ends with `<|start|>assistant`, so the parser starts inside a header whose
role is already known. A typical completion:

    <|channel|>analysis<|message|>think...<|end|>
    <|start|>assistant<|channel|>final<|message|>answer...<|return|>

or a tool call (recipient before or after the channel, both occur):

    <|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>

States and transitions (one token at a time):

    EXPECT_START --<|start|>--> HEADER --<|message|>--> CONTENT --<|end|>/<|return|>/
         ^                                                        <|call|>/<|endoftext|>
         +--------------------------------------------------------------+

Content text is decoded with an IncrementalDetokenizer, so a delta never ends inside a
UTF-8 character. Malformed streams never raise: text outside any header becomes content
of an assistant message without a channel, a header cut short by a stop token (or one
that runs past `max_header_tokens`, or contains a newline, which no real header does)
turns into content, and stray control tokens inside content end the message or are
dropped.

Reserved tokens (<|reserved_N|>, and ids past the tokenizer's last token, which gpt-oss's
padded vocabulary lets the model sample) carry nothing anywhere: they are dropped between
messages, inside a header and inside content. openai-harmony instead writes their text
("<|reserved_201000|>") into the content; we drop it so that a stray sample cannot leak
markup into an answer or corrupt a tool call's JSON arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass

from tandem.workers.engine.detokenizer import IncrementalDetokenizer
from tandem.workers.text.harmony.messages import ROLES, Message
from tandem.workers.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class MessageStart:
    """A message header was read; content deltas of this message follow."""

    role: str
    channel: str | None
    recipient: str | None
    content_type: str | None


@dataclass(frozen=True)
class ReasoningDelta:
    """New text of an assistant message on the analysis channel."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """New answer text: assistant messages on final, or without a channel, and
    commentary addressed to no tool (a preamble the user may see)."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """New argument text of a tool call in progress."""

    index: int
    # Position of this call among the tool calls of the stream (0, 1, ...).
    name: str
    # Function name without the "functions." namespace.
    arguments: str
    # The newly decoded part of the arguments.


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call (emitted when its message ends, normally on <|call|>)."""

    index: int
    name: str
    arguments: str
    # The full argument text (JSON for function tools; not validated here).


@dataclass(frozen=True)
class MessageEnd:
    """A message is complete."""

    message: Message
    terminator: str | None
    # "end" | "return" | "call" | "endoftext", or None when cut short (EOS, malformed).


HarmonyEvent = MessageStart | ReasoningDelta | ContentDelta | ToolCallDelta | ToolCall | MessageEnd


class _State(enum.Enum):
    EXPECT_START = "expect_start"
    HEADER = "header"
    CONTENT = "content"


@dataclass(frozen=True)
class _Header:
    role: str
    name: str | None
    channel: str | None
    recipient: str | None
    content_type: str | None
    constrain: bool = True
    # Whether the content type followed <|constrain|> (see Message.constrain).

    @property
    def tool_name(self) -> str | None:
        """The called function's name when this header opens an assistant tool call."""
        if self.role != "assistant" or self.recipient in (None, "all", "assistant"):
            return None
        return self.recipient.removeprefix("functions.")


_MARKER_VALUE = re.compile(r"[^\s<]*")


def _word(text: str) -> str | None:
    """A header word up to any stray "<" (header words never contain one)."""
    return text.split("<", 1)[0] or None


def _take_marker(text: str, marker: str) -> tuple[str, str | None]:
    """Remove `marker` and the word after it from `text`; return (rest, word or None)."""
    at = text.find(marker)
    if at == -1:
        return text, None
    after = at + len(marker)
    word = _MARKER_VALUE.match(text, after)
    assert word is not None  # the pattern matches the empty string
    value = word.group(0) or None
    return text[:at] + " " + text[word.end() :], value


def parse_header(text: str, role: str | None) -> _Header:
    """Parse decoded header text, e.g. "assistant to=functions.f<|channel|>commentary
    <|constrain|>json". `role` is the role when the prompt already gave it."""
    rest, channel = _take_marker(text, "<|channel|>")
    rest, content_type = _take_marker(rest, "<|constrain|>")
    words = [w for w in map(_word, rest.split()) if w is not None]
    name = None
    if role is None:
        author = words.pop(0) if words else "assistant"
        role, _, suffix = author.partition(":")
        if role not in ROLES:
            # An unknown author is a tool speaking, e.g. "functions.get_weather".
            role, name = "tool", author
        elif suffix:
            name = suffix
    elif words and words[0] == role:
        words.pop(0)
    recipient = None
    leftover = []
    for word in words:
        if word.startswith("to=") and recipient is None:
            recipient = word[3:] or None
        else:
            leftover.append(word)
    # "to=python code": a bare word after the recipient is its content type, written
    # without <|constrain|> (kept so that rendering the message gives the same tokens).
    constrain = True
    if content_type is None and recipient is not None and leftover:
        content_type, constrain = leftover[-1], False
    return _Header(role, name, channel, recipient, content_type, constrain)


class HarmonyStreamParser:
    """Feed sampled token ids one at a time; get typed events back."""

    def __init__(
        self, tokenizer: Tokenizer, role: str | None = "assistant", max_header_tokens: int = 128
    ) -> None:
        """`role`: the role the prompt already opened (None: expect <|start|> first)."""
        if role is not None and (role not in ROLES or role == "tool"):
            raise ValueError(f"role must be a non-tool role of {ROLES} or None, got {role!r}")
        if max_header_tokens < 1:
            raise ValueError(f"max_header_tokens must be >= 1, got {max_header_tokens}")
        self._tok = tokenizer
        self._max_header = max_header_tokens
        sp = tokenizer.special
        self._terminators = {
            sp.end: "end",
            sp.return_: "return",
            sp.call: "call",
            sp.endoftext: "endoftext",
        }
        # The named control tokens; any other special id is a reserved one (see above).
        self._control = frozenset(getattr(sp, f.name) for f in dataclasses.fields(sp))
        self._state = _State.HEADER if role is not None else _State.EXPECT_START
        self._role = role
        self._header_ids: list[int] = []
        self._header: _Header | None = None
        self._detok: IncrementalDetokenizer | None = None
        self._content: list[str] = []
        self._tool_calls = 0
        self.messages: list[Message] = []

    def feed(self, token_id: int) -> list[HarmonyEvent]:
        """Consume one sampled token."""
        sp = self._tok.special
        events: list[HarmonyEvent] = []
        if self._state is _State.EXPECT_START:
            if token_id == sp.start:
                self._begin_header(None)
            elif token_id == sp.channel:
                # "<|end|><|channel|>final": the model skipped "<|start|>assistant".
                self._begin_header("assistant")
                self._header_ids.append(token_id)
            elif not self._tok.is_special(token_id):
                self._open(_Header("assistant", None, None, None, None), events)
                self._content_token(token_id, events)
            # Any other control token between messages carries nothing: dropped.
        elif self._state is _State.HEADER:
            self._header_token(token_id, events)
        else:
            self._content_control_or_text(token_id, events)
        return events

    def finish(self) -> list[HarmonyEvent]:
        """End of stream: close whatever is open."""
        events: list[HarmonyEvent] = []
        if self._state is _State.HEADER:
            self._abort_header(None, events)
        elif self._state is _State.CONTENT:
            self._close(None, events)
        self._state = _State.EXPECT_START
        return events

    def _begin_header(self, role: str | None) -> None:
        self._state = _State.HEADER
        self._role = role
        self._header_ids = []

    def _header_token(self, token_id: int, events: list[HarmonyEvent]) -> None:
        sp = self._tok.special
        if self._tok.is_special(token_id) and token_id not in self._control:
            return  # a reserved token inside a header: nothing to read
        if token_id == sp.message:
            text = self._tok.decode(self._header_ids)
            self._open(parse_header(text, self._role), events)
        elif token_id in (sp.channel, sp.constrain) or not self._tok.is_special(token_id):
            self._header_ids.append(token_id)
            if len(self._header_ids) > self._max_header or "\n" in self._header_plain_text():
                self._header_to_content(events)
        else:
            # A stop token or <|start|> before <|message|>: the header was never finished.
            self._abort_header(self._terminators.get(token_id), events)
            if token_id == sp.start:
                self._begin_header(None)

    def _header_plain_text(self) -> str:
        return self._tok.decode(self._header_ids, skip_special_tokens=True)

    def _abort_header(self, terminator: str | None, events: list[HarmonyEvent]) -> None:
        """A header cut short: what was written there is content (if anything)."""
        if self._header_plain_text().strip():
            self._header_to_content(events)
            self._close(terminator, events)
        self._state = _State.EXPECT_START

    def _header_to_content(self, events: list[HarmonyEvent]) -> None:
        """Treat the header tokens so far as content text of a channel-less message."""
        ids = [t for t in self._header_ids if not self._tok.is_special(t)]
        self._open(_Header(self._role or "assistant", None, None, None, None), events)
        for t in ids:
            self._content_token(t, events)

    def _content_control_or_text(self, token_id: int, events: list[HarmonyEvent]) -> None:
        sp = self._tok.special
        if token_id in self._terminators:
            self._close(self._terminators[token_id], events)
        elif token_id == sp.start:
            self._close(None, events)
            self._begin_header(None)
        elif token_id == sp.channel:
            # A new header without <|end|><|start|>: continue as the same author.
            assert self._header is not None
            self._close(None, events)
            self._begin_header(self._header.role if self._header.role != "tool" else None)
            self._header_ids.append(token_id)
        elif not self._tok.is_special(token_id):
            self._content_token(token_id, events)
        # Other control tokens (<|message|>, <|constrain|>, reserved) mean nothing here.

    def _open(self, header: _Header, events: list[HarmonyEvent]) -> None:
        self._state = _State.CONTENT
        self._header = header
        self._detok = IncrementalDetokenizer(self._tok)
        self._content = []
        events.append(
            MessageStart(header.role, header.channel, header.recipient, header.content_type)
        )

    def _content_token(self, token_id: int, events: list[HarmonyEvent]) -> None:
        assert self._detok is not None
        self._emit_text(self._detok.push([token_id]), events)

    def _emit_text(self, text: str, events: list[HarmonyEvent]) -> None:
        header = self._header
        if not text or header is None:
            return
        self._content.append(text)
        if header.role != "assistant":
            return  # another role's text (a hallucinated turn) is not for the client
        if header.tool_name is not None:
            events.append(ToolCallDelta(self._tool_calls, header.tool_name, text))
        elif header.channel == "analysis":
            events.append(ReasoningDelta(text))
        else:
            events.append(ContentDelta(text))

    def _close(self, terminator: str | None, events: list[HarmonyEvent]) -> None:
        header, detok = self._header, self._detok
        assert header is not None and detok is not None
        self._emit_text(detok.flush(), events)
        content = "".join(self._content)
        if header.tool_name is not None:
            events.append(ToolCall(self._tool_calls, header.tool_name, content))
            self._tool_calls += 1
        message = Message(
            role=header.role,
            content=content,
            channel=header.channel,
            recipient=header.recipient,
            name=header.name,
            content_type=header.content_type,
            constrain=header.constrain,
        )
        self.messages.append(message)
        events.append(MessageEnd(message, terminator))
        self._state = _State.EXPECT_START
        self._header = self._detok = None
        self._content = []
