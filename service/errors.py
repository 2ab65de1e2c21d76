"""Every error the service answers, decided here at the HTTP edge: status, code, words and headers.

Errors have one JSON shape on every route, OpenAI's: `{"error": {"message", "type", "param", "code"}}`.
Workers and the trip to them say *why* a request failed (a `Refusal`: a reason key and its figures);
`REASONS` turns each into an answer. One exception handler per error type answers them all, the
framework's own 404, 405 and malformed-body errors included.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

# nginx's status for "the client closed the connection before the answer": logged and counted, never received.
CLIENT_CLOSED = 499
# OpenAI's error types by status: clients (the openai package among them) key on them.
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
# Validation errors that break a service limit rather than the request's shape.
LIMIT_EXCEEDED = "limit_exceeded"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return _TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready (any generation has been cancelled)."""


class Refusal(Exception):
    """A request that cannot get its generation, for `reason` (a key of REASONS) with the figures in `detail`."""

    def __init__(self, reason: str, **detail):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def waiting_for(path: Path) -> str:
    """What readiness and generation answer while no model is loaded yet."""
    return f"waiting for a checkpoint in {Path(path).parent} ({Path(path).name} not loaded yet)"


def unresponsive(silent: dict[int, float]) -> str:
    """What readiness and generation answer about workers that stopped posting heartbeats: each worker by
    its index, with the time (time.time) of its last heartbeat."""
    now = time.time()
    return "; ".join(
        f"inference worker {worker} has not answered a heartbeat since "
        f"{dt.datetime.fromtimestamp(at, dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({now - at:.0f} s)"
        for worker, at in silent.items()
    )


def draining(grace: float) -> str:
    """What readiness answers once the service has been told to stop (see --accept-grace)."""
    return (
        f"the service is stopping: it still takes requests for up to {grace:g} s after the stop signal, for load "
        "balancers to take it out, then finishes the running ones; send new requests elsewhere"
    )


@dataclass(frozen=True)
class Answer:
    status: int
    code: str
    message: Callable[..., str]
    param: str | None = None
    retry_after: int | None = None


# Why a request did not get its generation, as the worker or the trip to it says, and how we answer.
REASONS: dict[str, Answer] = {
    "not_ready": Answer(503, "model_not_ready", waiting_for, retry_after=5),
    "too_long": Answer(
        422,
        "context_length_exceeded",
        lambda prompt_tokens, max_new_tokens, context: (
            f"the prompt's {prompt_tokens} tokens plus {max_new_tokens} new tokens exceed the model's context "
            f"of {context} tokens"
        ),
        param="prompt",
    ),
    "queue_full": Answer(
        429,
        "queue_full",
        lambda held, batch, queue: (
            f"the worker already holds {held} requests (a batch of {batch} and a queue of {queue}); retry later"
        ),
        retry_after=1,
    ),
    "no_worker": Answer(
        503, "worker_unavailable", lambda timeout: f"no inference worker took the request within {timeout:g} s"
    ),
    "unresponsive": Answer(
        503,
        "worker_unavailable",
        lambda silent: f"no inference worker can take the request: {unresponsive(silent)}",
        retry_after=5,
    ),
    "worker_died": Answer(
        503,
        "worker_unavailable",
        lambda worker: f"inference worker {worker} died while generating; retry the request",
        retry_after=1,
    ),
    "worker_stalled": Answer(
        503,
        "worker_stalled",
        lambda worker, seconds: (
            f"inference worker {worker} has made no progress for {seconds:.0f} s; the request was cancelled"
        ),
        retry_after=5,
    ),
    "worker_error": Answer(500, "worker_error", lambda: "the inference worker failed to process the request"),
    "generation_failed": Answer(500, "generation_failed", lambda: "generation failed inside the inference worker"),
    "training_log_unreadable": Answer(
        503, "training_log_unreadable", lambda problem: f"cannot read the training log: {problem}", retry_after=5
    ),
    "training_log_slow": Answer(
        503,
        "training_log_slow",
        lambda path, seconds: f"reading the training log {path} takes longer than {seconds:g} s",
        retry_after=5,
    ),
    "shutting_down": Answer(
        503, "shutting_down", lambda seconds: f"the service stopped after draining for {seconds:g} s; retry elsewhere"
    ),
}


def as_api_error(error: APIError | Refusal) -> APIError:
    """The answer to an error: APIErrors are answers already, refusals are looked up in REASONS."""
    if isinstance(error, APIError):
        return error
    answer = REASONS[error.reason]
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after else None
    return APIError(answer.status, answer.message(**error.detail), answer.code, answer.param, headers)


def from_validation(error: ValidationError, status: int) -> APIError:
    """The first problem of a pydantic validation error, naming its field.

    Limits (see LIMIT_EXCEEDED) answer 422 whatever `status` the route uses for malformed input.
    """
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"] if param is None else f"{param}: {first['msg']}"
    if first["type"] == "json_invalid":
        return APIError(status, f"the body is not valid JSON ({first['msg']})", code="invalid_json")
    if first["type"] == LIMIT_EXCEEDED:
        return APIError(422, message, code=LIMIT_EXCEEDED, param=param)
    return APIError(status, message, code=first["type"], param=param)


def install_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""

    async def api_error(request: Request, error: APIError | Refusal) -> JSONResponse:
        return as_api_error(error).response()

    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            answer = APIError(404, f"no route {request.url.path}", code="not_found")
        elif error.status_code == 405:
            answer = APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            answer = APIError(error.status_code, str(error.detail), code="http_error")
        answer.headers.update(error.headers or {})
        return answer.response()

    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return APIError(422, str(first["msg"]), code="invalid_request", param=param).response()

    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Refusal, api_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
