"""The generation routes, `/predict` and OpenAI's `/v1/completions` and `/v1/models`.

A LitSpec lets one LitAPI (one set of inference workers, one engine each) serve several routes: its
handlers run in LitServe's HTTP processes, validate and tokenize there, and hand the worker a
ready `GenerationRequest` (see calls.py for the trip). Nothing is sent to the client before the
worker accepted the request, so a streamed request that cannot run still gets a 4xx or 5xx.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
from collections.abc import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from pydantic import BaseModel, ValidationError

from model import SamplingParams, Tokenizer
from service import schemas
from service.access import CLIENT_CLOSED
from service.auth import authorize
from service.board import Board
from service.calls import ClientGone, WorkerCall
from service.errors import LIMIT_EXCEEDED, APIError, from_validation
from service.limits import read_body
from service.messages import Accepted, GenerationRequest
from service.settings import ServiceSettings

DONE_EVENT = "data: [DONE]\n\n"


class GenerationSpec(LitSpec):
    def __init__(self, settings: ServiceSettings, board: Board, controls: list[mp.Queue]):
        super().__init__()
        self.api_path = "/predict"
        self.settings = settings
        self.board = board
        self.controls = controls
        self.created = int(time.time())
        self.tokenizer: Tokenizer | None = None

    @property
    def stream(self) -> bool:
        return True

    def pre_setup(self, lit_api) -> None:
        self.add_endpoint("/predict", self.predict, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def setup(self, server) -> None:
        super().setup(server)
        # Loaded once in the main process, before LitServe forks the HTTP servers that share it.
        if self.tokenizer is None:
            self.tokenizer = Tokenizer()

    def __getstate__(self):
        # Inference workers get token ids, not text: they need no tokenizer from here.
        return {**super().__getstate__(), "tokenizer": None}

    # Routes

    async def predict(self, request: Request) -> Response:
        try:
            authorize(request, self.settings.api_key)
            body = await self._parse(request, schemas.PredictRequest, malformed_status=422)
            call, accepted = await self._start(request, body.prompt, body.sampling())
        except APIError as e:
            return e.response()
        headers = _model_headers(accepted)
        if body.stream:
            return _event_stream(self._predict_events(request, call, accepted), headers)

        def answer(text: str, finish_reason: str | None, usage: dict) -> dict:
            return schemas.predict_body(text, finish_reason, usage, accepted.model)

        return await self._whole(request, call, answer, headers)

    async def completions(self, request: Request) -> Response:
        try:
            authorize(request, self.settings.api_key)
            body = await self._parse(request, schemas.CompletionRequest, malformed_status=400)
            if body.model != self.settings.model_name:
                raise APIError(
                    404,
                    f"the model {body.model!r} does not exist; this service serves {self.settings.model_name!r}",
                    code="model_not_found",
                    param="model",
                )
            call, accepted = await self._start(request, body.prompt, body.sampling())
        except APIError as e:
            return e.response()
        completion_id = f"cmpl-{request.state.request_id}"
        created = int(time.time())
        headers = _model_headers(accepted)

        def completion(text: str, finish_reason: str | None, usage: dict | None = None) -> dict:
            return schemas.completion_body(
                completion_id, created, self.settings.model_name, accepted.model, text, finish_reason, usage
            )

        if body.streaming:
            events = self._completion_events(request, call, completion, body.include_usage)
            return _event_stream(events, headers)
        return await self._whole(request, call, completion, headers)

    async def models(self, request: Request) -> Response:
        try:
            authorize(request, self.settings.api_key)
        except APIError as e:
            return e.response()
        model = {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "gpt-service"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _whole(self, request: Request, call: WorkerCall, answer, headers: dict) -> Response:
        """A non-streamed answer: wait for the whole text, then `answer(text, finish_reason, usage)` as JSON."""
        try:
            text = await call.text(request.is_disconnected)
        except APIError as e:
            return e.response()
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            self._finish(request, call)
        usage = schemas.usage(call.prompt_tokens, call.completion_tokens)
        return JSONResponse(answer(text, call.finish_reason, usage), headers=headers)

    # Streams

    async def _predict_events(self, request: Request, call: WorkerCall, accepted: Accepted) -> AsyncIterator[str]:
        try:
            async for chunk in call.chunks():
                event = {"text": chunk.text}
                if chunk.finish_reason is not None:
                    usage = schemas.usage(call.prompt_tokens, call.completion_tokens)
                    event.update(finish_reason=chunk.finish_reason, usage=usage, model=accepted.model.as_dict())
                yield _event(event)
        except APIError as e:
            yield e.sse()
        finally:
            self._finish(request, call)
        yield DONE_EVENT

    async def _completion_events(self, request: Request, call: WorkerCall, completion, include_usage: bool):
        try:
            async for chunk in call.chunks():
                yield _event(completion(chunk.text, chunk.finish_reason))
            if include_usage:
                # OpenAI sends usage in a last chunk of its own, with no choices.
                final = completion("", None, schemas.usage(call.prompt_tokens, call.completion_tokens))
                yield _event({**final, "choices": []})
        except APIError as e:
            yield e.sse()
        finally:
            self._finish(request, call)
        yield DONE_EVENT

    # Shared steps

    async def _parse(self, request: Request, schema: type[BaseModel], malformed_status: int):
        raw = await read_body(request, self.settings.max_body_bytes)
        try:
            return schema.model_validate_json(raw, context={"max_new_tokens": self.settings.max_new_tokens})
        except ValidationError as e:
            raise from_validation(e, malformed_status) from None

    async def _start(self, request: Request, prompt: str, params: SamplingParams) -> tuple[WorkerCall, Accepted]:
        """Tokenize and hand the request to a worker; return the call once a worker accepted it."""
        # tiktoken releases the GIL, so a long prompt does not stall the other requests of this process.
        tokens = await asyncio.to_thread(self.tokenizer.encode, prompt)
        if len(tokens) > self.settings.max_prompt_tokens:
            raise APIError(
                422,
                f"prompt: {len(tokens)} tokens exceed the limit of {self.settings.max_prompt_tokens}",
                code=LIMIT_EXCEEDED,
                param="prompt",
            )
        state = request.state
        generation = GenerationRequest(state.request_id, tokens, params, state.received_at)
        call = WorkerCall(self, self.board, self.controls, self.settings.queue_timeout)
        try:
            accepted = await call.start(generation)
        except BaseException:
            call.close()
            raise
        state.worker = accepted.worker_id
        return call, accepted

    def _finish(self, request: Request, call: WorkerCall) -> None:
        """Cancel the generation if the answer was abandoned, and leave the figures for the access log."""
        call.cancel()
        call.close()
        state = request.state
        state.prompt_tokens, state.completion_tokens = call.prompt_tokens, call.completion_tokens
        state.finish_reason = call.finish_reason


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _event_stream(events: AsyncIterator[str], headers: dict[str, str]) -> StreamingResponse:
    # No-cache and no proxy buffering, so each token reaches the client when it is produced.
    headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _model_headers(accepted: Accepted) -> dict[str, str]:
    headers = {"X-Model-Checkpoint": accepted.model.checkpoint}
    if accepted.model.step is not None:
        headers["X-Model-Step"] = str(accepted.model.step)
    return headers


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
