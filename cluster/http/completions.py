"""POST /v1/completions: a raw prompt (text or token ids, no harmony) continued, as
OpenAI's legacy completions API shapes it (text_completion objects and chunks)."""

from __future__ import annotations

import time
from typing import Any

from tandem.cluster.api import prepare
from tandem.cluster.api.backend import InvalidRequestError, ModelCard
from tandem.cluster.http.chat import usage_json
from tandem.cluster.http.schema import CompletionRequest, given_sampling
from tandem.workers.engine.outputs import RequestOutput
from tandem.workers.text.tokenizer import Tokenizer


def prompt_ids(
    body: CompletionRequest, tokenizer: Tokenizer, model: ModelCard, text_limit: int
) -> list[int]:
    """One prompt: a string, a list of token ids, or a list holding one of either."""
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("prompt", "prompt: one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prepare.text_prompt(prompt, tokenizer, text_limit)
    return prepare.token_prompt(prompt, model)


def sampling(body: CompletionRequest) -> dict[str, Any]:
    for name in ("echo", "suffix"):
        if getattr(body, name):
            raise InvalidRequestError(name, f"{name}: not supported by this server")
    for name in ("n", "best_of"):
        if getattr(body, name) not in (None, 1):
            raise InvalidRequestError(name, f"{name}: only one choice per request is supported")
    given = given_sampling(body)
    if body.max_tokens is not None:
        given["max_tokens"] = body.max_tokens
    if body.logprobs is not None:
        given["logprobs"] = body.logprobs
    return given


def stop(body: CompletionRequest) -> tuple[str, ...]:
    return (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"


class CompletionBuilder:
    """text_completion objects: one per streamed delta, or one for the whole answer."""

    def __init__(
        self, rid: str, model: str, tokenizer: Tokenizer, want_logprobs: bool, include_usage: bool
    ) -> None:
        self._rid, self._model, self._tok = rid, model, tokenizer
        self._want_logprobs, self._include_usage = want_logprobs, include_usage
        self._created = int(time.time())
        self._text: list[str] = []
        self._lp: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": []}
        self._offset = 0
        self._offsets: list[int] = []
        self.finish_reason: str | None = None
        self.usage = None

    def _logprobs(self, out: RequestOutput) -> dict[str, Any]:
        piece: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for lp in out.logprobs:
            token = self._tok.token_bytes(lp.token_id).decode("utf-8", errors="replace")
            piece["tokens"].append(token)
            piece["token_logprobs"].append(lp.logprob)
            piece["top_logprobs"].append(
                {self._tok.token_bytes(t).decode("utf-8", errors="replace"): v for t, v in lp.top}
            )
            piece["text_offset"].append(self._offset)
            self._offset += len(token)
        return piece

    def _object(self, text: str, finish: str | None, logprobs: Any) -> dict[str, Any]:
        obj = {
            "id": self._rid,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
        }
        return obj

    def chunks(self, out: RequestOutput) -> list[dict[str, Any]]:
        logprobs = self._logprobs(out) if self._want_logprobs else None
        chunk = self._object(out.text_delta, _finish(out.finish_reason), logprobs)
        if self._include_usage:
            chunk["usage"] = None
        result = [chunk]
        if out.finished and self._include_usage:
            last = {k: v for k, v in chunk.items() if k != "choices"}
            last["choices"] = []
            last["usage"] = usage_json(out.usage)
            result.append(last)
        return result

    def add(self, out: RequestOutput) -> None:
        self._text.append(out.text_delta)
        if self._want_logprobs:
            for key, values in self._logprobs(out).items():
                self._lp.setdefault(key, []).extend(values)
        if out.finished:
            self.finish_reason = _finish(out.finish_reason)
            self.usage = out.usage

    def completion(self) -> dict[str, Any]:
        obj = self._object(
            "".join(self._text),
            self.finish_reason or "stop",
            self._lp if self._want_logprobs else None,
        )
        obj["usage"] = usage_json(self.usage) if self.usage else None
        return obj
