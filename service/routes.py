"""The HTTP edge: every route of the service, run in LitServe's HTTP processes.

Generation routes (`/predict`, OpenAI's `/v1/completions`) check the key, read and validate the body,
tokenize, and hand the request to a worker through `bridge.WorkerCall`; nothing is sent to the client
before the worker accepted the request, so a streamed request that cannot run still gets a real 4xx
or 5xx. Errors are raised (`APIError`, `Refusal`) and answered by service/errors.py's handlers, or,
once a stream has started, written as an `error` event; `sse` writes every event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.requests import ClientDisconnect

from model import EOT_TOKEN, SamplingParams, Tokenizer, native
from service import metrics, schemas
from service.bridge import DrainingServer, RouteSpec, WorkerCall, process_index
from service.errors import (
    LIMIT_EXCEEDED,
    APIError,
    ClientGone,
    Refusal,
    as_api_error,
    draining,
    from_validation,
    unresponsive,
    waiting_for,
)
from service.messages import Accepted, GenerationRequest
from service.page import Page
from service.settings import ServiceSettings
from service.status import Status, StatusBoard

# GPT-2's longest token is 128 bytes: a prompt of more characters than this many times the token limit
# cannot fit, and is refused before any time goes into tokenizing it.
MAX_TOKEN_CHARS = 128
# Prompts up to this many characters are tokenized at once (well under a millisecond); longer ones take
# turns on one thread per HTTP process, so that a flood of huge prompts costs a core, not the service.
SHORT_PROMPT = 4096


def sse(data: dict | str) -> str:
    """One server-sent event: a JSON object, or the `[DONE]` that ends every stream."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


DONE = sse("[DONE]")


class Routes:
    def __init__(self, settings: ServiceSettings, board: StatusBoard, controls: list, spec: RouteSpec):
        self.settings = settings
        self.board = board
        self.controls = controls
        self.spec = spec
        self.created = int(time.time())
        # Loaded once in the main process, before LitServe forks the HTTP servers that share it.
        self.tokenizer = Tokenizer()
        self._bodies = _BodyBudget(settings.max_body_bytes)
        self._long_prompts: tuple[int, ThreadPoolExecutor] | None = None
        for path, handler, methods in (
            ("/predict", self.predict, ["POST"]),
            ("/v1/completions", self.completions, ["POST"]),
            ("/v1/models", self.models, ["GET"]),
            ("/v1/models/{model_id}", self.model, ["GET"]),
            ("/health", self.health, ["GET"]),
            ("/metrics", self.metrics, ["GET"]),
        ):
            spec.add_endpoint(path, handler, methods)
        Page(settings, self.authorize, spec)

    # Generation

    async def predict(self, request: Request) -> Response:
        self.authorize(request)
        body = await self._parse(request, schemas.PredictRequest, malformed_status=422)
        call, accepted = await self._start(request, body.prompt, body.sampling(self.settings.speculation))
        headers = _model_headers(accepted)

        def final(text: str, finish_reason: str) -> dict:
            return schemas.predict_body(text, finish_reason, _usage(call), accepted.model)

        if body.stream:

            def event(chunk) -> dict:
                return final(chunk.text, chunk.finish_reason) if chunk.finish_reason else {"text": chunk.text}

            return self._stream(request, call, event, None, headers)
        return await self._whole(request, call, final, headers)

    async def completions(self, request: Request) -> Response:
        self.authorize(request)
        body = await self._parse(request, schemas.CompletionRequest, malformed_status=400)
        if body.model != self.settings.model_name:
            raise self._unknown_model(body.model, "model")
        call, accepted = await self._start(request, body.prompt, body.sampling(self.settings.speculation))
        completion_id = f"cmpl-{request.state.request_id}"
        created = int(time.time())

        def completion(text: str, finish_reason: str | None, usage: dict | None = None) -> dict:
            return schemas.completion_body(
                completion_id, created, self.settings.model_name, accepted.model, text, finish_reason, usage
            )

        headers = _model_headers(accepted)
        if body.streaming:

            def usage_chunk() -> dict:
                # OpenAI sends usage in a last chunk of its own, with no choices.
                return {**completion("", None, _usage(call)), "choices": []}

            event = lambda chunk: completion(chunk.text, chunk.finish_reason)  # noqa: E731
            return self._stream(request, call, event, usage_chunk if body.include_usage else None, headers)
        return await self._whole(request, call, lambda text, reason: completion(text, reason, _usage(call)), headers)

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request, model_id: str) -> Response:
        self.authorize(request)
        if model_id != self.settings.model_name:
            raise self._unknown_model(model_id, None)
        return JSONResponse(self._model_card())

    # Probes, never behind the key

    async def health(self, request: Request) -> Response:
        """200 when every inference worker serves a model, answers heartbeats and moves and the service is not
        stopping, 503 with the reason otherwise."""
        workers = self.board.workers()
        body = {"status": "ready", "kernels": native.status(),
                "workers": [_worker_view(w, self.settings.stall_timeout) for w in workers]}
        starting = [w.worker_id for w in workers if w.status is Status.STARTING]
        stalled = [w.worker_id for w in workers if w.stalled_for > self.settings.stall_timeout]
        silent = {w.worker_id: w.heartbeat_at for w in workers if w.unresponsive}
        if DrainingServer.stopping:
            # First, so that a load balancer stops sending here while requests are still accepted.
            body.update(status="draining", message=draining(self.settings.accept_grace))
        elif starting:
            body.update(status="starting", message=f"inference workers {starting} are starting")
        elif stalled:
            body.update(status="stalled", message=f"inference workers {stalled} hold requests and make no progress")
        elif silent:
            body.update(status="unresponsive", message=unresponsive(silent))
        elif any(w.status is Status.WAITING for w in workers):
            body.update(status="waiting", message=waiting_for(self.settings.checkpoint_path))
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    async def metrics(self, request: Request) -> Response:
        data, content_type = metrics.render(self.board)
        return Response(data, media_type=content_type)

    # Shared steps

    def authorize(self, request: Request) -> None:
        """401 unless no key is set or the request carries `Authorization: Bearer <key>`."""
        key: SecretStr | None = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long for a near miss as for a wild guess, so timing leaks nothing.
        expected = key.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _parse(self, request: Request, schema: type[BaseModel], malformed_status: int):
        raw = await self._bodies.read(request)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            # Browsers send cross-site form posts without asking first; JSON bodies need a preflight.
            raise APIError(
                415,
                f"the body must be JSON, sent with 'Content-Type: application/json' (got {media_type or 'none'!r})",
                code="unsupported_media_type",
            )
        try:
            return schema.model_validate_json(raw, context={"max_new_tokens": self.settings.max_new_tokens})
        except ValidationError as e:
            raise from_validation(e, malformed_status) from None

    async def _start(self, request: Request, prompt: str, params: SamplingParams) -> tuple[WorkerCall, Accepted]:
        """Tokenize and hand the request to a worker; return the call once a worker accepted it."""
        tokens = await self._tokenize(prompt)
        state = request.state
        generation = GenerationRequest(state.request_id, tokens, params, state.received_at, process_index())
        s = self.settings
        call = WorkerCall(self.spec, self.board, self.controls, s.queue_timeout, s.stall_timeout)
        try:
            accepted = await call.start(generation)
        except BaseException:
            call.close()
            raise
        state.worker = accepted.worker_id
        return call, accepted

    async def _tokenize(self, prompt: str) -> list[int]:
        limit = self.settings.max_prompt_tokens
        if len(prompt) > MAX_TOKEN_CHARS * limit:
            raise APIError(
                422,
                f"prompt: {len(prompt)} characters cannot fit the limit of {limit} tokens",
                code=LIMIT_EXCEEDED,
                param="prompt",
            )
        if len(prompt) <= SHORT_PROMPT:
            tokens = self.tokenizer.encode(prompt)
        else:
            # tiktoken releases the GIL: the event loop goes on serving while the thread tokenizes.
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(self._tokenizer_thread(), self.tokenizer.encode, prompt)
        if not tokens:
            # An empty prompt (OpenAI's routes accept one) starts a new document, as every text follows end-of-text.
            return [EOT_TOKEN]
        if len(tokens) > limit:
            raise APIError(
                422, f"prompt: {len(tokens)} tokens exceed the limit of {limit}", code=LIMIT_EXCEEDED, param="prompt"
            )
        return tokens

    def _tokenizer_thread(self) -> ThreadPoolExecutor:
        # Made in the HTTP process that uses it: threads do not survive the fork that starts one.
        if self._long_prompts is None or self._long_prompts[0] != os.getpid():
            self._long_prompts = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="tokenizer"))
        return self._long_prompts[1]

    async def _whole(self, request: Request, call: WorkerCall, answer: Callable, headers: dict) -> Response:
        """A non-streamed answer: wait for the whole text, then `answer(text, finish_reason)` as JSON."""
        try:
            text = await call.text(request.is_disconnected)
        finally:
            self._finish(request, call)
        return JSONResponse(answer(text, call.finish_reason), headers=headers)

    def _stream(self, request: Request, call: WorkerCall, event: Callable, last: Callable | None, headers: dict):
        """The chunks as server-sent events (`event(chunk)` each, then `last()` if given), an error event if
        the generation fails after the stream started, and always `[DONE]`."""

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in call.chunks():
                    yield sse(event(chunk))
                if last is not None:
                    yield sse(last())
            except (APIError, Refusal) as e:
                yield sse(as_api_error(e).body())
            finally:
                self._finish(request, call)
            yield DONE

        # No-cache and no proxy buffering, so each token reaches the client when it is produced.
        headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    def _finish(self, request: Request, call: WorkerCall) -> None:
        """Cancel the generation if the answer was abandoned, and leave the figures for the access log."""
        call.cancel()
        call.close()
        state = request.state
        state.prompt_tokens, state.completion_tokens = call.prompt_tokens, call.completion_tokens
        state.drafted_tokens = call.drafted_tokens
        state.finish_reason = call.finish_reason

    def _model_card(self) -> dict:
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "gpt-service"}

    def _unknown_model(self, model: str, param: str | None) -> APIError:
        return APIError(
            404,
            f"the model {model!r} does not exist; this service serves {self.settings.model_name!r}",
            code="model_not_found",
            param=param,
        )


class _BodyBudget:
    """Reads request bodies within two bounds: `limit` bytes each, and `limit` x 16 for all the bodies an
    HTTP process is receiving at once, so that slow uploads cannot pile up memory."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = limit * 16
        self.held = 0

    async def read(self, request: Request) -> bytes:
        too_large = APIError(413, f"the request body exceeds the limit of {self.limit} bytes", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise too_large
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limit:
                    raise too_large
                if self.held + len(chunk) > self.total:
                    raise APIError(
                        503,
                        "the service is receiving too many request bodies at once; retry shortly",
                        code="busy",
                        headers={"Retry-After": "1"},
                    )
                self.held += len(chunk)
                parts.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        finally:
            self.held -= sum(len(part) for part in parts)
        return b"".join(parts)


def _usage(call: WorkerCall) -> dict:
    return schemas.usage(call.prompt_tokens, call.completion_tokens, call.drafted_tokens)


def _model_headers(accepted: Accepted) -> dict[str, str]:
    headers = {"X-Model-Checkpoint": accepted.model.checkpoint}
    if accepted.model.step is not None:
        headers["X-Model-Step"] = str(accepted.model.step)
    return headers


def _worker_view(worker, stall_timeout: float) -> dict:
    if worker.stalled_for > stall_timeout:
        status = "stalled"
    elif worker.unresponsive:
        status = "unresponsive"
    else:
        status = worker.status.name.lower()
    return {
        "worker": worker.worker_id,
        "status": status,
        "unresponsive_since": worker.heartbeat_at if worker.unresponsive else None,
        "step": worker.step,
        "val_loss": worker.val_loss,
        "checkpoint": worker.checkpoint or None,
        "loaded_at": worker.loaded_at,
        "dtype": worker.dtype or None,
        "draft": worker.draft and {**worker.draft.as_dict(), "loaded_at": worker.draft_loaded_at},
    }


REQUEST_BODIES = {"/predict": schemas.PredictRequest, "/v1/completions": schemas.CompletionRequest}


def document_request_bodies(app) -> None:
    """Tell the OpenAPI schema what the generation routes take.

    Their handlers read the body themselves, to answer errors in this service's format, so FastAPI
    cannot infer it; clients, docs and schema-driven fuzzers need it.
    """
    for route in app.routes:
        model = REQUEST_BODIES.get(getattr(route, "path", None))
        if model is not None and "POST" in route.methods:
            content = {"application/json": {"schema": _inline_schema(model)}}
            route.openapi_extra = {"requestBody": {"required": True, "content": content}}


def _inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its `$defs` inlined (OpenAPI resolves refs elsewhere)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)
