"""TEST DOUBLE for the fronts' output conversion (harmony splitting, chunk and event
shapes): a backend that replays a fixed token stream instead of running a model, so a
test can hand the gRPC or HTTP front exactly the reasoning, answer and tool-call tokens a
real gpt-oss would sample (the tiny model's random weights rarely do)."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from tandem.cluster.api.backend import (
    GenerationBackend,
    GenerationDelta,
    GenerationRequest,
    HealthStatus,
    ModelCard,
)
from tandem.workers.engine.outputs import RequestOutput, Timings, Usage
from tandem.workers.text.tokenizer import Tokenizer


class ReplayBackend(GenerationBackend):
    """Replays `token_ids`, three tokens per delta, and records the requests given."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        token_ids: list[int],
        finish_reason: str = "stop",
        model_id: str = "replay",
        max_model_len: int = 256,
    ) -> None:
        self._tokenizer = tokenizer
        self._ids = token_ids
        self._finish = finish_reason
        self._card = ModelCard(model_id, max_model_len, tokenizer.vocab_size)
        self.requests: list[GenerationRequest] = []

    @property
    def models(self) -> tuple[ModelCard, ...]:
        return (self._card,)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        self.requests.append(request)
        n = len(request.prompt_token_ids)
        for start in range(0, len(self._ids), 3):
            piece = tuple(self._ids[start : start + 3])
            done = start + 3 >= len(self._ids)
            yield GenerationDelta(
                RequestOutput(
                    request_id=request.request_id,
                    token_ids=piece,
                    text_delta="",
                    finished=done,
                    finish_reason=self._finish if done else None,
                    usage=Usage(n, 0, start + len(piece)),
                    timings=Timings(0.001, 0.002, 0.003, 0.0005) if done else None,
                )
            )

    async def check_health(self) -> HealthStatus:
        return HealthStatus(True)


def harmony_ids(tok: Tokenizer, pieces: list[str]) -> list[int]:
    """Pieces are either a special token's text ("<|end|>") or plain text."""
    ids: list[int] = []
    for piece in pieces:
        if piece.startswith("<|") and piece.endswith("|>"):
            ids.append(tok.special_id(piece))
        else:
            ids.extend(tok.encode(piece))
    return ids
