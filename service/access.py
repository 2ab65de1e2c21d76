"""Request ids, the access log and the per-request metrics, for every HTTP request.

A pure ASGI middleware rather than a FastAPI dependency: it sees the real end of a streamed
response (and a client that left halfway), which a route handler returning a StreamingResponse
does not. Route handlers leave token counts and the finish reason in the request state.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from service import metrics
from service.errors import CLIENT_CLOSED
from service.messages import FINISH_ABORT

log = logging.getLogger("service.access")

GENERATION_ROUTES = frozenset({"/predict", "/v1/completions"})


class AccessLog:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, received_at=time.monotonic())
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _record(scope, state, status, time.monotonic() - state["received_at"])


def _record(scope, state: dict, status: int | None, latency: float) -> None:
    finish_reason = state.get("finish_reason")
    if status is None:
        status = CLIENT_CLOSED if finish_reason == FINISH_ABORT else 500
    path = scope["path"]
    entry = {
        "request_id": state["request_id"],
        "method": scope["method"],
        "path": path,
        "status": status,
        "latency_ms": round(latency * 1000, 3),
        "prompt_tokens": state.get("prompt_tokens"),
        "completion_tokens": state.get("completion_tokens"),
        "drafted_tokens": state.get("drafted_tokens"),
        "finish_reason": finish_reason,
        "worker": state.get("worker"),
    }
    generation = path in GENERATION_ROUTES
    # Probes and scrapes arrive every few seconds: logged only when debugging.
    log.log(logging.INFO if generation else logging.DEBUG, json.dumps(entry))
    if generation:
        metrics.REQUESTS.labels(path, str(status), finish_reason or "none").inc()
        if status == 200 and finish_reason not in (None, FINISH_ABORT):
            metrics.E2E_LATENCY.observe(latency)
