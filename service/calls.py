"""One generation request on its way from an HTTP process to an inference worker and back.

It goes in through LitServe's request queue and its messages come back through LitServe's response
buffer, the way LitServe's own OpenAISpec drives its workers. What LitServe does not do is done
here: wait for the worker's first message before answering (so the status code is known before any
header is sent), notice a worker that died with the request in flight (LitServe only fails such
requests in the main process's buffer, not in the HTTP processes'), and cancel the generation when
the client goes away.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import pickle
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import HTTPException
from litserve.utils import LitAPIStatus, ResponseBufferItem

from service.board import Board
from service.errors import APIError
from service.messages import FINISH_ABORT, Accepted, Chunk, Failed, GenerationRequest, Rejected
from service.proctree import alive

# How often a waiting request checks that its worker still lives (and its client still listens).
CHECK_INTERVAL = 0.5


class WorkerLost(APIError):
    def __init__(self, message: str):
        super().__init__(503, message, code="worker_unavailable")


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the generation has been cancelled."""


class WorkerCall:
    def __init__(self, spec, board: Board, controls: list[mp.Queue], pickup_timeout: float):
        self._spec = spec
        self._board = board
        self._controls = controls
        self._pickup_timeout = pickup_timeout
        self._uid: str | None = None
        self._event = asyncio.Event()
        self._messages: deque = deque()
        self.accepted: Accepted | None = None
        self.done = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def start(self, request: GenerationRequest) -> Accepted:
        """Hand the request to a worker; return its acceptance or raise its refusal as an APIError."""
        self._uid = request.request_id
        self.prompt_tokens = len(request.prompt)
        self._spec.response_buffer[self._uid] = ResponseBufferItem(event=self._event, response_queue=self._messages)
        self._spec.request_queue.put((self._spec.response_queue_id, self._uid, time.monotonic(), request))
        deadline = time.monotonic() + self._pickup_timeout + CHECK_INTERVAL
        answer = await self._next(None, deadline)
        if isinstance(answer, Rejected):
            self.done = True
            headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after else None
            raise APIError(answer.status, answer.message, code=answer.code, param=answer.param, headers=headers)
        if not isinstance(answer, Accepted):
            raise RuntimeError(f"inference worker answered {answer!r} before accepting the request")
        self.accepted = answer
        return answer

    async def chunks(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[Chunk]:
        """The accepted request's chunks, up to the one with a finish reason."""
        while not self.done:
            message = await self._next(disconnected)
            if isinstance(message, Failed):
                self.done = True
                raise APIError(500, message.message, code="generation_failed")
            self.completion_tokens += message.tokens
            if message.finish_reason is not None:
                self.done = True
                self.finish_reason = message.finish_reason
            yield message

    async def text(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> str:
        """The whole generated text, for answers that are not streamed."""
        return "".join([chunk.text async for chunk in self.chunks(disconnected)])

    def cancel(self) -> None:
        """Stop the generation if it still runs: its client is gone."""
        if not self.done and self.accepted is not None:
            self.done = True
            self.finish_reason = FINISH_ABORT
            self._controls[self.accepted.worker_id].put(self._uid)

    def close(self) -> None:
        self._spec.response_buffer.pop(self._uid, None)

    async def _next(self, disconnected, deadline: float | None = None):
        while not self._messages:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), CHECK_INTERVAL)
            except TimeoutError:
                await self._check_client(disconnected)
                self._check_worker(deadline)
        # While tokens keep coming the wait above never times out: without this check a client that left
        # would keep its batch row until its whole answer had been generated.
        await self._check_client(disconnected)
        data, status = self._messages.popleft()
        if status == LitAPIStatus.ERROR:
            self.done = True
            raise _litserve_error(data)
        if status == LitAPIStatus.FINISH_STREAMING:
            self.done = True
            raise WorkerLost("the inference worker ended the request without finishing it")
        return data

    async def _check_client(self, disconnected) -> None:
        # Before acceptance the worker is unknown and cannot be told to cancel: wait for it.
        if self.accepted is not None and disconnected is not None and await disconnected():
            self.cancel()
            raise ClientGone()

    def _check_worker(self, deadline: float | None) -> None:
        if self.accepted is None:
            if time.monotonic() > deadline:
                raise WorkerLost(f"no inference worker took the request within {self._pickup_timeout:g} s")
            return
        pid = self._board.worker_pid(self.accepted.worker_id)
        if pid != self.accepted.pid or not alive(self.accepted.pid):
            self.done = True
            raise WorkerLost(f"inference worker {self.accepted.worker_id} died while generating; retry the request")


def _litserve_error(data) -> APIError:
    """An error LitServe's loop sent instead of our messages (a queue timeout, or an exception in predict)."""
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:
            data = None
    if isinstance(data, HTTPException) and data.status_code == 504:
        return WorkerLost(f"the request waited too long for an inference worker ({data.detail})")
    return APIError(500, "the inference worker failed to process the request", code="worker_error")
