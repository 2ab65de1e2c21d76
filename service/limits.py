"""Reading a request body without letting its size exceed the service's limit."""

from __future__ import annotations

from fastapi import Request

from service.errors import APIError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as the declared or received size passes `limit` bytes."""
    too_large = APIError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)
