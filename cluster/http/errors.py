"""Errors of the HTTP API in OpenAI's JSON shape, {"error": {"message", "type", "param",
"code"}}, and the status each of our exceptions maps to:

    400 invalid_request_error   the field in `param`  (gRPC INVALID_ARGUMENT)
    401 (API key missing/wrong)                       (UNAUTHENTICATED)
    429 + Retry-After           queue full            (RESOURCE_EXHAUSTED)
    503                         backend unavailable   (UNAVAILABLE)
    504                         deadline passed       (DEADLINE_EXCEEDED)
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi.responses import JSONResponse

from tandem.cluster.api.backend import BackendUnavailable, InvalidRequestError, QueueFull
from tandem.workers.engine.sampling_params import SamplingParamsError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class DeadlineExceeded(Exception):
    """The request's deadline passed while it ran."""


def bearer_ok(header: str | None, api_key: str) -> bool:
    """Whether an Authorization header is "Bearer <api_key>" (constant time)."""
    raw = (header or "").encode("utf-8", "surrogateescape")
    scheme, _, token = raw.partition(b" ")
    token_ok = hmac.compare_digest(token.strip(), api_key.encode("utf-8"))
    return scheme.lower() == b"bearer" and token_ok


def bad_request(param: str, message: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param=param)


def error_for(err: BaseException, retry_after_s: int = 1) -> ApiError:
    """The OpenAI-shaped error of an exception raised while serving a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, (SamplingParamsError, InvalidRequestError)):
        return bad_request(err.field, str(err))
    if isinstance(err, QueueFull):
        return ApiError(
            429,
            f"overloaded: {err}",
            "rate_limit_error",
            code="rate_limit_exceeded",
            # admission control's estimate where it made one, else the configured value
            headers={"Retry-After": str(err.retry_after_s or retry_after_s)},
        )
    if isinstance(err, BackendUnavailable):
        return ApiError(503, f"unavailable: {err}", "server_error", code="unavailable")
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, "the deadline passed", "timeout", code="deadline_exceeded")
    log.error("request failed", exc_info=err)
    return ApiError(500, "internal error", "server_error")
