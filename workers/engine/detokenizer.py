"""Streaming text out of sampled tokens.

`IncrementalDetokenizer` turns token ids into text a few at a time. Byte-level BPE
tokens are byte strings, and one character can span several tokens (an emoji is four
bytes, often four tokens in a small vocabulary), so text is released only once its
UTF-8 sequence is complete: nothing is ever streamed and then corrected.

`StopStringMatcher` cuts generation at user-supplied stop strings. A stop string can
arrive split over several deltas, so text that could still turn out to be the start of
one is held back until it is either completed (the stop fires, the text is dropped) or
ruled out (the text is released).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.workers.text.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Decodes a stream of token ids into text deltas, never splitting a character.

    Invariant: the concatenation of every `push` result and `flush()` equals
    `tokenizer.decode(all_ids)` (with the same `skip_special_tokens`). Any id the model
    can sample is accepted: one past the tokenizer's last token (gpt-oss pads its
    vocabulary to 201,088 rows) adds no text and never raises, so one such sample cannot
    take down the engine step that produced it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Holds at most the first bytes of one incomplete UTF-8 sequence between pushes;
        # invalid bytes become U+FFFD exactly as the library's decode does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Iterable[int]) -> str:
        """Add tokens; return the text they complete (possibly "")."""
        tok = self._tokenizer
        data = b"".join(
            tok.token_bytes(t) for t in token_ids if not (self._skip_special and tok.is_special(t))
        )
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: release held bytes (an unfinished character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


@dataclass(frozen=True)
class StopCheck:
    """What `StopStringMatcher.feed` decided about one delta."""

    text: str
    # Text safe to emit now (never includes any part of a stop string that fired).
    stop: str | None
    # The stop string that completed, or None.


class StopStringMatcher:
    """Finds stop strings across text deltas and holds back possible beginnings of one."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if isinstance(stop_strings, str):
            raise ValueError("stop_strings must be a sequence of strings, not one string")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {list(stop_strings)!r}")
        self._stops = tuple(dict.fromkeys(stop_strings))
        self._held = ""
        self._stopped: str | None = None

    @property
    def stopped(self) -> str | None:
        """The stop string that fired, once one has."""
        return self._stopped

    def feed(self, delta: str) -> StopCheck:
        """Add a text delta; return what may be emitted and whether a stop fired.

        After a stop has fired, further deltas are ignored (empty text, same stop).
        """
        if self._stopped is not None:
            return StopCheck("", self._stopped)
        buf = self._held + delta
        # The earliest completed stop wins; text before it is emitted, the rest dropped.
        hit_at, hit = len(buf) + 1, None
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and at < hit_at:
                hit_at, hit = at, stop
        if hit is not None:
            self._held = ""
            self._stopped = hit
            return StopCheck(buf[:hit_at], hit)
        keep = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - keep :]
        return StopCheck(buf[: len(buf) - keep], None)

    def flush(self) -> str:
        """End of stream without a stop: release what was held back."""
        held, self._held = self._held, ""
        return "" if self._stopped is not None else held

    def _longest_partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string.

        Any future match must start inside this suffix: a match starting earlier would
        make a longer suffix a prefix of that stop string.
        """
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
