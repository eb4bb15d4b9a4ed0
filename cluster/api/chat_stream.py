"""Chat outputs, whichever front they go out through: the token deltas of a harmony
completion split into reasoning, answer text and tool calls (`ChatDelta`), which
convert.py writes as ChatChunks and cluster/http/ as OpenAI chunks and events.

A turn that ends in <|call|> finishes with "tool_calls"; otherwise the engine's finish
reason ("stop", "length", "abort") stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.cluster.api.backend import GenerationDelta
from tandem.workers.text.harmony import (
    ContentDelta,
    HarmonyEvent,
    HarmonyStreamParser,
    MessageEnd,
    ReasoningDelta,
    ToolCall,
    ToolCallDelta,
)
from tandem.workers.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatDelta:
    """What one backend delta adds to the assistant's turn."""

    delta: GenerationDelta
    # The backend's delta (token ids, usage and timings on the last one).
    reasoning: str
    # Analysis-channel text.
    content: str
    # Final (and preamble) text.
    tool_call_deltas: tuple[ToolCallDelta, ...]
    # Argument text of calls in progress, in order (index, name, text).
    tool_calls: tuple[ToolCall, ...]
    # Calls whose message closed in this delta (index, name, whole arguments).
    finish_reason: str | None
    # Set on the last delta: "stop", "length", "abort" or "tool_calls".
    events: tuple[HarmonyEvent, ...] = ()
    # The parser's events in order (message starts and ends included), for a front that
    # maps whole messages (the Responses API's output items).

    @property
    def finished(self) -> bool:
        return self.delta.output.finished


class ChatSplitter:
    """Feeds a turn's sampled tokens through harmony's stream parser, one backend delta
    at a time. `prefix_ids` are header tokens the prompt already holds (a forced call's
    header, prepare.ForcedCall): the parser reads them first and reports nothing for
    them but their MessageStart, which leads the first delta's events."""

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = ()) -> None:
        self._parser = HarmonyStreamParser(tokenizer, role="assistant")
        self._pending: list[HarmonyEvent] = [e for t in prefix_ids for e in self._parser.feed(t)]

    def split(self, delta: GenerationDelta) -> ChatDelta:
        out = delta.output
        events, self._pending = self._pending, []
        events += [event for t in out.token_ids for event in self._parser.feed(t)]
        if out.finished:
            events += self._parser.finish()
        finish = None
        if out.finished:
            called = any(isinstance(e, MessageEnd) and e.terminator == "call" for e in events)
            finish = (
                "tool_calls"
                if out.finish_reason == "stop" and called
                else (out.finish_reason or "stop")
            )
        return ChatDelta(
            delta=delta,
            reasoning="".join(e.text for e in events if isinstance(e, ReasoningDelta)),
            content="".join(e.text for e in events if isinstance(e, ContentDelta)),
            tool_call_deltas=tuple(e for e in events if isinstance(e, ToolCallDelta)),
            tool_calls=tuple(e for e in events if isinstance(e, ToolCall)),
            finish_reason=finish,
            events=tuple(events),
        )
