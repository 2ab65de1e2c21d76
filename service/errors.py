"""Errors as HTTP answers: one exception type and one JSON shape (OpenAI's) on every route."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import ValidationError

# OpenAI's error types by status: clients (the openai package among them) key on them.
_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


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

    def sse(self) -> str:
        """The error as a server-sent event, for errors after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


# Validation errors that break a service limit rather than the request's shape.
LIMIT_EXCEEDED = "limit_exceeded"


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
