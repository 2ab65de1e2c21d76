"""The thread that owns an inference worker's engines and runs continuous batching.

Requests arrive from the worker's asyncio loop (one task per request, fed by LitServe's async
streaming loop) through `submit`, which answers at once with `Accepted` or `Rejected`. The
scheduler thread sleeps on a condition while there is nothing to do, so an idle worker costs no
CPU; otherwise it admits new requests and steps every engine by one token, handing each request's
`Chunk`s to its sink as they are produced. A request leaves the batch the step it finishes and a
new one joins at the next step.

Hot reload: `install` makes a new engine current. Requests accepted before keep running on the
engine (and weights) they were accepted by; each engine with work is stepped until it drains and
is then dropped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from model import ContextLengthError, Engine
from service import metrics
from service.messages import FINISH_ABORT, Accepted, Chunk, Failed, GenerationRequest, ModelInfo, Rejected

log = logging.getLogger(__name__)

Sink = Callable[[object], None]


@dataclass
class Loaded:
    """A model ready to serve: the engine that runs it and what to call it in responses."""

    engine: Engine
    info: ModelInfo


@dataclass
class Tracked:
    """One accepted request (TGI keeps the same per-request state beside its batches)."""

    request: GenerationRequest
    sink: Sink
    loaded: Loaded
    last_token_at: float | None = None


class Scheduler:
    def __init__(
        self,
        worker_id: int,
        max_queued: int,
        batch_wait: float,
        unavailable: str,
        rebuild: Callable[[Loaded], Loaded],
    ):
        self.worker_id = worker_id
        self.max_queued = max_queued
        self.batch_wait = batch_wait
        self.unavailable = unavailable
        self._rebuild = rebuild
        self._cond = threading.Condition()
        self._current: Loaded | None = None
        self._inbox: list[Tracked] = []
        self._cancels: set[str] = set()
        # Owned by the scheduler thread.
        self._requests: dict[str, Tracked] = {}
        self._active: list[Loaded] = []
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{worker_id}", daemon=True)

    # Called from other threads.

    @property
    def serving(self) -> ModelInfo | None:
        current = self._current
        return current.info if current else None

    def start(self) -> None:
        self._thread.start()

    def install(self, loaded: Loaded) -> None:
        """Serve `loaded` to requests accepted from now on."""
        with self._cond:
            self._current = loaded
            self._cond.notify()

    def submit(self, request: GenerationRequest, sink: Sink) -> Accepted | Rejected:
        """Accept a request (its chunks then go to `sink`, from the scheduler thread) or say why not."""
        with self._cond:
            loaded = self._current
            if loaded is None:
                return Rejected(503, self.unavailable, code="model_not_ready")
            engine = loaded.engine
            try:
                engine.check_fits(len(request.prompt), request.params.max_new_tokens)
            except ContextLengthError:
                return Rejected(
                    422,
                    f"the prompt's {len(request.prompt)} tokens plus {request.params.max_new_tokens} new tokens "
                    f"exceed the model's context of {engine.max_seq_len} tokens",
                    code="context_length_exceeded",
                    param="prompt",
                )
            except ValueError as e:
                return Rejected(422, str(e), code="invalid_prompt", param="prompt")
            inbox = sum(1 for t in self._inbox if t.loaded is loaded)
            # Counts read while the scheduler thread steps are at most one step old: close enough for a bound.
            held = inbox + engine.num_running + engine.num_waiting
            if held >= engine.max_batch_size + self.max_queued:
                return Rejected(
                    429,
                    f"the worker already holds {held} requests (a batch of {engine.max_batch_size} "
                    f"and a queue of {self.max_queued}); retry later",
                    code="queue_full",
                    retry_after=1,
                )
            self._inbox.append(Tracked(request, sink, loaded))
            self._cond.notify()
        return Accepted(self.worker_id, os.getpid(), loaded.info)

    def cancel(self, request_id: str) -> None:
        """Stop a request whose client went away; its row is freed at the next step."""
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    # The scheduler thread.

    def _run(self) -> None:
        try:
            self._schedule()
        except BaseException:
            # Accepted requests would wait forever on a dead scheduler. A dead worker is noticed instead:
            # its requests fail with 503 and LitServe starts a replacement.
            log.critical("the scheduler crashed; ending the worker so that it is replaced", exc_info=True)
            os._exit(70)

    def _schedule(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._has_work()):
                    self._cond.wait()
                self._wait_for_batch()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            for tracked in inbox:
                self._admit(tracked)
            for request_id in cancels:
                self._cancel(request_id)
            for loaded in list(self._active):
                self._step(loaded)
            self._active = [a for a in self._active if a.engine.has_work()]
            metrics.RUNNING.set(sum(a.engine.num_running for a in self._active))
            metrics.WAITING.set(sum(a.engine.num_waiting for a in self._active))

    def _has_work(self) -> bool:
        return any(a.engine.has_work() for a in self._active)

    def _wait_for_batch(self) -> None:
        """When idle, give a burst of requests `batch_wait` seconds to arrive and share the first prefill."""
        if self.batch_wait <= 0 or self._has_work() or not self._inbox or self._current is None:
            return
        deadline = time.monotonic() + self.batch_wait
        while len(self._inbox) < self._current.engine.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _admit(self, tracked: Tracked) -> None:
        request = tracked.request
        tracked.loaded.engine.add(request.prompt, request.params, request.request_id)
        self._requests[request.request_id] = tracked
        if tracked.loaded not in self._active:
            self._active.append(tracked.loaded)

    def _cancel(self, request_id: str) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is not None:
            tracked.loaded.engine.cancel(request_id)
            _deliver(tracked, Chunk("", 0, FINISH_ABORT))

    def _step(self, loaded: Loaded) -> None:
        started = time.monotonic()
        try:
            events = loaded.engine.step()
        except Exception:
            log.exception("decode step failed; failing the requests of its batch and rebuilding the engine")
            self._fail(loaded)
            return
        now = time.monotonic()
        if events:
            metrics.BATCH_SIZE.observe(len(events))
            metrics.GENERATION_TOKENS.inc(len(events))
        for event in events:
            tracked = self._requests.get(event.request_id)
            if tracked is None:
                continue
            if tracked.last_token_at is None:
                metrics.QUEUE_TIME.observe(started - tracked.request.received_at)
                metrics.TIME_TO_FIRST_TOKEN.observe(now - tracked.request.received_at)
                metrics.PROMPT_TOKENS.inc(len(tracked.request.prompt))
            else:
                metrics.INTER_TOKEN_LATENCY.observe(now - tracked.last_token_at)
            tracked.last_token_at = now
            if event.finished:
                del self._requests[event.request_id]
            _deliver(tracked, Chunk(event.text, 1, event.finish_reason))

    def _fail(self, loaded: Loaded) -> None:
        """Fail every request of an engine whose step raised; a current engine is rebuilt fresh."""
        with self._cond:
            queued = [t for t in self._inbox if t.loaded is loaded]
            self._inbox = [t for t in self._inbox if t.loaded is not loaded]
            if self._current is loaded:
                self._current = self._rebuild(loaded)
        running = [t for t in self._requests.values() if t.loaded is loaded]
        for tracked in running:
            del self._requests[tracked.request.request_id]
        for tracked in running + queued:
            _deliver(tracked, Failed("generation failed inside the inference worker"))
        self._active.remove(loaded)


def _deliver(tracked: Tracked, message: object) -> None:
    try:
        tracked.sink(message)
    except RuntimeError:
        # The worker's event loop is closing: nobody is left to read this request's messages.
        log.debug("dropped a message for request %s", tracked.request.request_id)
