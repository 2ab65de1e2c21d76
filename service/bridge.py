"""Everything that relies on LitServe's (0.2.19) and uvicorn's private behaviour, and nothing else.

LitServe gives us processes (forked HTTP servers, spawned inference workers, a Manager process holding
the queues between them) and an async streaming loop; what the product needs beyond that, it takes from
their internals here, so that an upgrade means reading this one file. `RELIED_ON` lists each private
thing with the reason; tests/service/test_service_internals.py fails, naming it, when one is gone.

LitServe:
1. The request tuple `(response_queue_id, uid, enqueued_at, payload)` its loops take from the request
   queue (`LitSpec.request_queue`), and their dropping of one whose `enqueued_at` is older than the
   timeout: `WorkerCall` feeds requests in directly (a route handler must read the worker's first answer
   before it sends a status code), and a replacement worker feeds an expired one to unblock the Manager
   queue `get` its dead predecessor left pending, which would otherwise swallow the next request.
2. The response buffer (`LitSpec.response_buffer`, a dict uid -> `ResponseBufferItem(event,
   response_queue)`) that each HTTP process's consumer task fills with `(data, LitAPIStatus)` pairs.
3. `LITSERVE_WORKER_ID`, the index LitServe puts in the environment of each HTTP server and inference
   worker; `LitSpec.response_queue_id`, the HTTP server's consumer id, set before each fork.
4. `LitServer._start_server(port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs)`,
   `_prepare_app_run`, `litserve.server._Server` (a uvicorn Server whose `run(worker_id, sockets)` sets 3):
   replaced so that HTTP servers run our uvicorn server (drain, then cut) and protocol (limits), and can
   be started again one at a time when one dies. `LitServer._register_internal_endpoints`, whose own
   `GET /` ("litserve running"), registered before our routes, is taken out for the page (service/page.py).
5. `LitServer._start_worker_monitoring(manager, uvicorn_workers)`, `inference_workers`,
   `launch_single_inference_worker`, `_perform_graceful_shutdown(manager, uvicorn_workers, reason)`, and
   the Manager's `_process` (multiprocessing): to supervise the HTTP servers and the Manager beside
   LitServe's own monitor of the workers, to stop that monitor respawning workers during a shutdown, and to
   stop every HTTP server at once. `LitServer._shutdown_event` (made by `_init_manager`), which the main
   thread waits on after `_start_worker_monitoring`: waited in short slices (`SlicedWait`), so that a
   signal another thread took is handled.
6. `LitSpec.__getstate__`, which LitServe uses to pickle the spec into spawned workers: ours leaves the
   routes behind (workers serve none).

uvicorn (0.54):
7. `uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` and its parser callbacks (`connection_made`,
   `on_message_begin`, `on_url`, `on_header`, `on_message_complete`, `on_response_complete`,
   `send_400_response`, `transport`, `cycle`): every request must arrive within --request-timeout, with
   bounded headers, and a malformed request is answered in the service's JSON error shape.
8. `uvicorn.Server.shutdown(sockets)`, `servers`, `server_state.connections`, `force_exit`, `_captured_signals`
   (the signals `capture_signals` raises again after the shutdown): keep serving for a grace period with
   /health failing, then drain running streams, then cut the rest with an error event rather than closing
   them mid-sentence, and exit with a status that says which.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import litserve as ls
import litserve.server
import uvicorn
from fastapi import HTTPException
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.errors import APIError, ClientGone, Refusal
from service.messages import FINISH_ABORT, Accepted, Chunk, Failed, GenerationRequest, Refused
from service.status import StatusBoard, alive

log = logging.getLogger(__name__)

RELIED_ON = {
    "litserve.server.LitServer._start_server": "HTTP servers run our uvicorn server and protocol, one at a time",
    "litserve.server.LitServer._prepare_app_run": "each HTTP server's app is prepared as LitServe does",
    "litserve.server.LitServer._register_internal_endpoints": "its 'litserve running' at / gives way to the page",
    "litserve.server.LitServer._start_worker_monitoring": "the HTTP servers and the Manager are supervised",
    "litserve.server.LitServer._init_manager": "its _shutdown_event, the main thread's wait, is waited in slices",
    "litserve.server.LitServer._perform_graceful_shutdown": "every HTTP server is stopped at once",
    "litserve.server.LitServer.launch_single_inference_worker": "no worker is respawned during a shutdown",
    "litserve.server._Server.run": "an HTTP server is a uvicorn Server that sets LITSERVE_WORKER_ID",
    "litserve.specs.base.LitSpec.__getstate__": "the spec is pickled into the workers without its routes",
    "litserve.specs.base.LitSpec.setup": "the spec gets the request queue and the response buffer",
    "litserve.utils.ResponseBufferItem": "a call's messages arrive in the HTTP process's response buffer",
    "litserve.utils.LitAPIStatus.ERROR": "LitServe's own failures (queue timeout, an exception in predict)",
    "litserve.utils.LitAPIStatus.FINISH_STREAMING": "a worker ended a request without a last chunk",
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_header": "request headers are bounded",
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_message_complete": "request arrival deadline",
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.on_response_complete": "keep-alive requests too",
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol.send_400_response": "malformed requests as JSON",
    "uvicorn.server.Server.shutdown": "running streams drain, then get an error event",
    "uvicorn.server.Server.capture_signals": "its _captured_signals, raised again after a shutdown, are dropped",
}


def missing_internals() -> list[str]:
    """The private things in RELIED_ON that the installed LitServe or uvicorn lacks."""
    missing = []
    for dotted in RELIED_ON:
        module_name, *attributes = dotted.split(".")
        while True:
            try:
                target = importlib.import_module(module_name)
                break
            except ModuleNotFoundError:
                if not attributes:
                    target = None
                    break
                module_name += "." + attributes.pop(0)
        for attribute in attributes:
            target = getattr(target, attribute, None)
        if target is None:
            missing.append(dotted)
    return missing


def process_index() -> int:
    """This HTTP server's or inference worker's index among its kind (LitServe's LITSERVE_WORKER_ID)."""
    return int(os.environ.get("LITSERVE_WORKER_ID", "0"))


# The trip of one request: HTTP process -> request queue -> worker -> response buffer -> HTTP process.

# How often a waiting request checks that its worker still lives and moves (and its client still listens).
CHECK_INTERVAL = 0.5


class WorkerCall:
    """One generation request on its way to an inference worker and back.

    LitServe's own specs wait for nothing: here the route reads the worker's first message before it sends
    a status code, notices a worker that died or stalled with the request in flight (LitServe fails such
    requests only in the main process's buffer), cancels the generation when the client leaves, and is
    cut with an error when the HTTP server stops before the stream could finish.
    """

    # The calls of this HTTP process that still wait for messages, for a drain that runs out of time.
    running: set[WorkerCall] = set()

    def __init__(self, spec: LitSpec, board: StatusBoard, controls: list, pickup_timeout: float, stall_timeout: float):
        self._spec = spec
        self._board = board
        self._controls = controls
        self._pickup_timeout = pickup_timeout
        self._stall_timeout = stall_timeout
        self._uid: str | None = None
        self._event = asyncio.Event()
        self._messages: deque = deque()
        self._cut: float | None = None
        self.accepted: Accepted | None = None
        self.done = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.drafted_tokens = 0
        self.finish_reason: str | None = None

    async def start(self, request: GenerationRequest) -> Accepted:
        """Hand the request to a worker; return its acceptance or raise its refusal."""
        self._uid = request.request_id
        self.prompt_tokens = len(request.prompt)
        workers = self._board.workers()
        if all(worker.unresponsive for worker in workers):
            # Stopped or frozen: the request would wait the whole pickup timeout for nothing.
            self.done = True
            raise Refusal("unresponsive", silent={w.worker_id: w.heartbeat_at for w in workers})
        WorkerCall.running.add(self)
        self._spec.response_buffer[self._uid] = ResponseBufferItem(event=self._event, response_queue=self._messages)
        self._spec.request_queue.put((self._spec.response_queue_id, self._uid, time.monotonic(), request))
        answer = await self._next(None, deadline=time.monotonic() + self._pickup_timeout + CHECK_INTERVAL)
        if isinstance(answer, Refused):
            self.done = True
            raise Refusal(answer.reason, **answer.detail)
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
                raise Refusal(message.reason)
            self.completion_tokens += message.tokens
            self.drafted_tokens += message.drafted
            if message.finish_reason is not None:
                self.done = True
                self.finish_reason = message.finish_reason
            yield message

    async def text(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> str:
        """The whole generated text, for answers that are not streamed."""
        return "".join([chunk.text async for chunk in self.chunks(disconnected)])

    def cancel(self) -> None:
        """Stop the generation if it still runs: its client is gone, or it will never be answered."""
        if not self.done and self.accepted is not None:
            self.done = True
            self.finish_reason = FINISH_ABORT
            self._controls[self.accepted.worker_id].put(self._uid)

    def close(self) -> None:
        WorkerCall.running.discard(self)
        self._spec.response_buffer.pop(self._uid, None)

    def cut(self, after: float) -> None:
        """End this call with an error at its next check: the HTTP server stops after draining `after` seconds."""
        self._cut = after
        self._event.set()

    async def _next(self, disconnected, deadline: float | None = None):
        while not self._messages:
            self._event.clear()
            self._check_cut()
            try:
                await asyncio.wait_for(self._event.wait(), CHECK_INTERVAL)
            except TimeoutError:
                await self._check_client(disconnected)
                self._check_worker(deadline)
        # While tokens keep coming the wait above never times out: without these checks a client that left
        # would keep its batch row until its whole answer had been generated.
        self._check_cut()
        await self._check_client(disconnected)
        data, status = self._messages.popleft()
        if status == LitAPIStatus.ERROR:
            self.done = True
            raise _litserve_error(data, self._pickup_timeout)
        if status == LitAPIStatus.FINISH_STREAMING:
            self.done = True
            raise Refusal("worker_error")
        return data

    def _check_cut(self) -> None:
        if self._cut is not None:
            self.cancel()
            raise Refusal("shutting_down", seconds=self._cut)

    async def _check_client(self, disconnected) -> None:
        # Before acceptance the worker is unknown and cannot be told to cancel: wait for it.
        if self.accepted is not None and disconnected is not None and await disconnected():
            self.cancel()
            raise ClientGone()

    def _check_worker(self, deadline: float | None) -> None:
        if self.accepted is None:
            if time.monotonic() > deadline:
                raise Refusal("no_worker", timeout=self._pickup_timeout)
            return
        worker = self._board.worker(self.accepted.worker_id)
        if worker.pid != self.accepted.pid or not alive(self.accepted.pid):
            self.done = True
            raise Refusal("worker_died", worker=self.accepted.worker_id)
        if worker.stalled_for > self._stall_timeout:
            self.cancel()
            raise Refusal("worker_stalled", worker=self.accepted.worker_id, seconds=worker.stalled_for)


def _litserve_error(data, pickup_timeout: float) -> Refusal:
    """An error LitServe's loop sent instead of our messages (a queue timeout, or an exception in predict)."""
    if isinstance(data, bytes):
        try:
            data = pickle.loads(data)
        except Exception:
            data = None
    if isinstance(data, HTTPException) and data.status_code == 504:
        return Refusal("no_worker", timeout=pickup_timeout)
    return Refusal("worker_error")


def unblock_dead_workers_get(request_queue) -> None:
    """Feed the request queue an expired request, which LitServe's loop drops.

    A worker that died was almost surely blocked on the request queue, a Manager queue: that `get` lives
    on in the Manager process and would swallow the next request.
    """
    request_queue.put((0, f"expired-{uuid.uuid4().hex}", float("-inf"), None))


class RouteSpec(LitSpec):
    """A LitSpec that only carries our routes into LitServe's app (it has no encode/decode of its own)."""

    def __init__(self):
        super().__init__()
        self.api_path = "/predict"

    @property
    def stream(self) -> bool:
        return True

    def __getstate__(self):
        return {**super().__getstate__(), "_endpoints": []}


class RegisterApiServer:
    """ASGI middleware that posts each HTTP server's pid on the status board when the server starts.

    LitServe forks its HTTP servers and gives them no start hook; the ASGI lifespan startup is the first
    thing each one runs.
    """

    def __init__(self, app, board: StatusBoard):
        self.app = app
        self.board = board

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            previous = self.board.claim_api(process_index())
            if previous and previous != os.getpid():
                metrics.forget_process(previous)
        await self.app(scope, receive, send)


# The HTTP servers.


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline for each request to arrive and bounded headers.

    uvicorn times out idle keep-alive connections only: a client that opens a connection and sends
    nothing, or a header line every few seconds, or a body a byte at a time, holds its file descriptor
    and buffers for as long as it likes. Here a request's headers and body must have arrived
    `request_timeout` seconds after the connection opened (or, on a kept-alive connection, after the
    request's first byte); else it gets 408 and the connection is closed.
    """

    request_timeout = 30.0
    max_headers = 100
    max_header_bytes = 16384

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._refusal: tuple[int, str, str] | None = None
        self._header_bytes = 0
        self._header_count = 0
        self._deadline = self.loop.call_later(self.request_timeout, self._late)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._late)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count(len(name) + len(value))
        if self._header_count > self.max_headers:
            self._refuse(431, f"more than {self.max_headers} request headers", "too_many_headers")
        super().on_header(name, value)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes:
            self._refuse(431, f"the request line and headers exceed {self.max_header_bytes} bytes", "headers_too_large")

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._refusal = (status, message, code)
        raise ValueError(message)  # httptools stops parsing and reports a parser error (see send_400_response)

    def _late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        metrics.HTTP_TIMEOUTS.inc()
        if self.cycle is None or not self.cycle.response_started:
            message = f"the request did not arrive within {self.request_timeout:g} s"
            self._write_error(408, message, "request_timeout")
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        status, message, code = self._refusal or (400, f"malformed HTTP request ({msg.rstrip('.')})", "bad_request")
        self._write_error(status, message, code)

    def _write_error(self, status: int, message: str, code: str) -> None:
        body = APIError(status, message, code).body()
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        content = json.dumps(body).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(content), content)
        )
        self.transport.close()


class DrainingServer(litserve.server._Server):
    """An HTTP server that, told to stop, first goes on serving for `accept_grace` seconds with /health
    answering 503 (draining), for a load balancer's checks to take it out before it stops listening: a
    request sent while they still pass would otherwise meet a closed listener, or be accepted and dropped.
    It then lets running streams finish for `drain_timeout` seconds and ends each one left with an error
    event and `[DONE]` (rather than closing it mid-sentence); it exits with status 3 if it had to cut any."""

    accept_grace = 5.0
    drain_timeout = 30.0
    stopping = False
    cut = 0

    async def shutdown(self, sockets=None) -> None:
        DrainingServer.stopping = True
        # uvicorn's main loop has ended, not its event loop: connections are still accepted and served.
        deadline = time.monotonic() + self.accept_grace
        while time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.1)
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + self.drain_timeout
        while WorkerCall.running and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.1)
        if WorkerCall.running:
            DrainingServer.cut = len(WorkerCall.running)
            log.error(
                "drain timeout: %d running request(s) still unfinished after %g s; ending them with an error",
                DrainingServer.cut,
                self.drain_timeout,
            )
            for call in list(WorkerCall.running):
                call.cut(self.drain_timeout)
            # The cut streams write their error event and [DONE], then close.
            flush_deadline = time.monotonic() + 5.0
            while self.server_state.connections and time.monotonic() < flush_deadline:
                await asyncio.sleep(0.05)
        await super().shutdown(sockets)
        # uvicorn raises the signal that stopped it again once it has shut down, which would end this process
        # with "killed by SIGTERM" after a clean drain: its exit status says how the drain went instead.
        self._captured_signals.clear()

    def run(self, worker_id: int, sockets=None) -> None:
        # uvicorn puts back the SIGTERM handler it found once it has served. LitServe's shutdown terminates each
        # server again after ours did, and that second SIGTERM, landing between the drain and the exit below,
        # turned a clean drain into "killed by SIGTERM" under load: ignored there, it changes nothing.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        super().run(worker_id, sockets)
        os._exit(3 if DrainingServer.cut else 0)


class Server(ls.LitServer):
    """LitServer whose HTTP servers drain and are supervised, and whose shutdown stops them all at once."""

    _stopping = False

    def __init__(
        self,
        *args,
        request_timeout: float,
        accept_grace: float,
        drain_timeout: float,
        on_http_death: Callable[[int], None],
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._request_timeout = request_timeout
        self._accept_grace = accept_grace
        self._drain_timeout = drain_timeout
        self._on_http_death = on_http_death
        # The main process waits this long for an HTTP server to drain and cut its streams before killing it.
        self.uvicorn_graceful_timeout = accept_grace + drain_timeout + 10
        self.exit_status = 0

    def _register_internal_endpoints(self) -> None:
        super()._register_internal_endpoints()
        # LitServe answers / with "litserve running", registered before our routes and so shadowing the
        # page (service/page.py) there.
        routes = self.app.router.routes
        routes[:] = [route for route in routes if getattr(route, "path", None) != "/"]

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        if uvicorn_worker_type != "process":
            raise ValueError("the service runs its HTTP servers as processes")
        self._http_args = (port, log_level, sockets, kwargs)
        return {index: self._start_http_server(index) for index in range(num_uvicorn_servers)}

    def _start_http_server(self, index: int) -> mp.Process:
        port, log_level, sockets, kwargs = self._http_args
        self.app.response_queue_id = index
        for lit_api in self.litapi_connector:
            if lit_api.spec:
                lit_api.spec.response_queue_id = index
        app = copy.copy(self.app)
        self._prepare_app_run(app)
        protocol = type("Protocol", (GuardedProtocol,), {"request_timeout": self._request_timeout})
        config = uvicorn.Config(app=app, host="0.0.0.0", port=port, log_level=log_level, http=protocol, **kwargs)
        server = DrainingServer(config=config)
        server.accept_grace = self._accept_grace
        server.drain_timeout = self._drain_timeout
        process = mp.get_context("fork").Process(target=server.run, args=(index, sockets), name=f"LitServer-{index}")
        process.start()
        return process

    def _start_worker_monitoring(self, manager, uvicorn_workers) -> None:
        # The last call before LitServe's main thread waits on the shutdown event for good.
        self._shutdown_event = SlicedWait(self._shutdown_event)
        super()._start_worker_monitoring(manager, uvicorn_workers)
        threading.Thread(
            target=self._supervise, args=(manager, uvicorn_workers), name="http-supervisor", daemon=True
        ).start()

    def _supervise(self, manager, uvicorn_workers: dict) -> None:
        """Start again any HTTP server that dies; end the service if the Manager (the queues) dies."""
        while not self._stopping:
            _exit_if_dead(manager)
            for index, process in list(uvicorn_workers.items()):
                if process.is_alive() or self._stopping:
                    continue
                log.error("HTTP server %d (pid %d) died with status %s; starting another", index, process.pid,
                          process.exitcode)  # fmt: skip
                metrics.RESTARTS.labels("api").inc()
                self._on_http_death(index)
                uvicorn_workers[index] = self._start_http_server(index)
            time.sleep(0.2)

    def launch_single_inference_worker(self, lit_api, worker_id):
        # LitServe's worker monitor respawns dead workers, the ones a shutdown is stopping included.
        if self._stopping:
            return self.inference_workers[worker_id]
        metrics.RESTARTS.labels("worker").inc()
        return super().launch_single_inference_worker(lit_api, worker_id)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        if shutdown_reason == "normal":
            # Neither Ctrl-C nor SIGTERM: LitServe's wait on the Manager's shutdown event broke, most likely with
            # the Manager itself, whose death the kernel may take a moment to make visible.
            manager._process.join(1.0)
            _exit_if_dead(manager)
        self._stopping = True
        if self._accept_grace:
            log.info("stopping: /health answers 503 and new requests are still served for %g s (--accept-grace), "
                     "then running ones get %g s to finish", self._accept_grace, self._drain_timeout)  # fmt: skip
        # LitServe stops the HTTP servers one after another, each draining up to the timeout while the others
        # still take new requests: signal them all first so they stop accepting together.
        for worker in uvicorn_workers.values():
            if worker.is_alive():
                worker.terminate()
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)
        cut = [worker.exitcode for worker in uvicorn_workers.values() if worker.exitcode]
        if cut:
            log.error("stopped without a clean drain: HTTP server exit statuses %s", cut)
            self.exit_status = 1


class SlicedWait:
    """LitServe's shutdown event (a Manager proxy), its `wait` made of short waits.

    Python runs signal handlers in the main thread only, between bytecodes. The kernel hands a signal for
    the process to any thread that does not block it, and one taken by another thread (the supervisor's,
    LitServe's monitor) left the main thread blocked in its read of the Manager's answer: a Ctrl-C or
    SIGTERM then went unhandled until something else woke it, and the service neither drained nor exited.
    """

    SLICE = 0.25

    def __init__(self, event):
        self._event = event

    def wait(self) -> bool:  # LitServe waits without a timeout
        while not self._event.wait(self.SLICE):
            pass
        return True

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        self._event.set()


def _exit_if_dead(manager) -> None:
    """End the service at once if LitServe's Manager died: it held every queue, and cannot be replaced."""
    if not manager._process.is_alive():
        log.critical("LitServe's queue manager died: exiting so that a supervisor restarts the service")
        os._exit(75)
