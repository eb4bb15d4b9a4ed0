"""What the engine hands back: per-step stream deltas and finished completions.

Plain dataclasses, so the cluster layer can turn them into protobuf without reaching
into engine internals.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    # Prompt tokens whose KV came from the prefix cache instead of being computed.
    cached_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds, measured on the engine's clock (time.monotonic)."""

    # Arrival to first scheduled step.
    queue_s: float
    # First scheduled step to the first sampled token (the prefill).
    prefill_s: float
    # Arrival to the first sampled token.
    ttft_s: float
    # Mean time between later tokens; 0 with fewer than two tokens.
    per_token_s: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    # The top-n alternatives (id, logprob), best first; empty when not asked for.
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One streamed delta of one request."""

    request_id: str
    token_ids: tuple[int, ...]
    # New text since the previous delta; never splits a UTF-8 character, and holds back
    # text that may still turn out to be the start of a stop string.
    text_delta: str
    finished: bool
    # "stop", "length" or "abort" once finished, else None.
    finish_reason: str | None
    usage: Usage
    timings: Timings | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Completion:
    """A finished request, accumulated from its deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def absorb(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.token_ids)
        self.text += out.text_delta
        self.logprobs.extend(out.logprobs)
        self.usage = out.usage
        if out.finished:
            self.finish_reason = out.finish_reason
            self.timings = out.timings

    def to_json(self) -> dict:
        return {
            "request_id": self.request_id,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": asdict(self.usage) if self.usage else None,
            "timings": asdict(self.timings) if self.timings else None,
        }
