"""The thread that owns an inference worker's engines and runs continuous batching.

Requests arrive from the worker's asyncio loop (one task per request, fed by LitServe's async
streaming loop) through `submit`, which answers at once with `Accepted` or `Refused` (a reason and its
figures; the HTTP edge words it). The scheduler thread sleeps on a condition while there is nothing
to do, so an idle worker costs no CPU; otherwise it admits new requests and steps every engine by one
token, handing each request's `Chunk`s to its sink as they are produced. A request leaves the batch
the step it finishes and a new one joins at the next step. After every step it tells the status
board that it moved, so that a stopped or hung worker is seen from outside.

Hot reload: `install` makes a new engine current. Requests accepted before keep running on the
engine (and weights) they were accepted by; each engine with work is stepped until it drains and
is then dropped. `set_draft` gives every engine a new draft model (speculative decoding) at the next
step boundary, running requests included: drafts decide only how soon their tokens come.

A step may give a request several tokens (kept drafts): they travel in one chunk, and count as one
row of the step's batch.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from model import ContextLengthError, TokenEvent
from model.speculation import Planner
from service import metrics
from service.loading import Draft, Loaded
from service.messages import FINISH_ABORT, Accepted, Chunk, Failed, GenerationRequest, Refused, ServerGone
from service.status import StatusBoard

log = logging.getLogger(__name__)

Sink = Callable[[object], None]


@dataclass
class Tracked:
    """One accepted request (TGI keeps the same per-request state beside its batches)."""

    request: GenerationRequest
    sink: Sink
    loaded: Loaded
    last_token_at: float | None = None


class Scheduler:
    def __init__(self, worker_id: int, max_queued: int, board: StatusBoard, checkpoint: str):
        self.worker_id = worker_id
        self.max_queued = max_queued
        self.board = board
        self.checkpoint = checkpoint
        self._cond = threading.Condition()
        self._current: Loaded | None = None
        self._draft: Draft | None = None
        # Requests accepted for the current model and not yet finished: the bound of submit(), kept here
        # under the lock because the engine's own counts miss the rows it is moving into its batch.
        self._held = 0
        self._inbox: list[Tracked] = []
        self._cancels: list[str | ServerGone] = []
        self._busy = False
        # Owned by the scheduler thread.
        self._requests: dict[str, Tracked] = {}
        self._active: list[Loaded] = []
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{worker_id}", daemon=True)

    # Called from other threads.

    @property
    def serving(self) -> Loaded | None:
        return self._current

    def start(self) -> None:
        self._thread.start()

    def install(self, loaded: Loaded) -> None:
        """Serve `loaded` to requests accepted from now on."""
        with self._cond:
            self._current = loaded
            self._held = 0
            self._cond.notify()

    def set_draft(self, draft: Draft) -> None:
        """Draft with `draft` from the next step on, in every engine."""
        with self._cond:
            self._draft = draft

    def submit(self, request: GenerationRequest, sink: Sink) -> Accepted | Refused:
        """Accept a request (its chunks then go to `sink`, from the scheduler thread) or say why not."""
        with self._cond:
            loaded = self._current
            if loaded is None:
                return Refused("not_ready", {"path": self.checkpoint})
            engine = loaded.engine
            try:
                engine.check_fits(len(request.prompt), request.params.max_new_tokens)
            except ContextLengthError:
                detail = {"prompt_tokens": len(request.prompt), "max_new_tokens": request.params.max_new_tokens}
                return Refused("too_long", {**detail, "context": engine.max_seq_len})
            if self._held >= engine.max_batch_size + self.max_queued:
                detail = {"held": self._held, "batch": engine.max_batch_size, "queue": self.max_queued}
                return Refused("queue_full", detail)
            self._held += 1
            self._inbox.append(Tracked(request, sink, loaded))
            if not self._busy:
                self._busy = True
                self.board.progress(self.worker_id, busy=True)
            self._cond.notify()
        return Accepted(self.worker_id, os.getpid(), loaded.info)

    def cancel(self, what: str | ServerGone) -> None:
        """Stop a request whose client went away (or every request of a dead HTTP server) at the next step."""
        with self._cond:
            self._cancels.append(what)
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
                    if self._busy:
                        self._busy = False
                        self.board.progress(self.worker_id, busy=False)
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                draft = self._draft
            for tracked in inbox:
                self._admit(tracked)
            for what in cancels:
                self._cancel(what)
            for loaded in self._active:
                if loaded.draft is not draft:
                    loaded.engine.set_draft(draft.model)
                    loaded.draft = draft
            for loaded in list(self._active):
                self._step(loaded)
            self._active = [a for a in self._active if a.engine.has_work()]
            self.board.progress(self.worker_id, busy=True)
            metrics.RUNNING.set(sum(a.engine.num_running for a in self._active))
            metrics.WAITING.set(sum(a.engine.num_waiting for a in self._active))

    def _has_work(self) -> bool:
        return any(a.engine.has_work() for a in self._active)

    def _admit(self, tracked: Tracked) -> None:
        request = tracked.request
        tracked.loaded.engine.add(request.prompt, request.params, request.request_id)
        self._requests[request.request_id] = tracked
        if tracked.loaded not in self._active:
            self._active.append(tracked.loaded)

    def _cancel(self, what: str | ServerGone) -> None:
        if isinstance(what, ServerGone):
            gone = [t for t in self._requests.values() if t.request.api_server == what.api_server]
        else:
            gone = [self._requests[what]] if what in self._requests else []
        for tracked in gone:
            del self._requests[tracked.request.request_id]
            self._release(tracked)
            tracked.loaded.engine.cancel(tracked.request.request_id)
            _deliver(tracked, Chunk("", 0, FINISH_ABORT))

    def _release(self, tracked: Tracked) -> None:
        with self._cond:
            if tracked.loaded is self._current:
                self._held -= 1

    def _step(self, loaded: Loaded) -> None:
        started = time.monotonic()
        planner = loaded.engine.planner
        checked = _speculation_counts(planner)
        try:
            events = loaded.engine.step()
        except Exception:
            log.exception("decode step failed; failing the requests of its batch and starting a fresh engine")
            self._fail(loaded)
            return
        now = time.monotonic()
        _count_speculation(planner, checked)
        produced: dict[str, list[TokenEvent]] = {}
        for event in events:
            produced.setdefault(event.request_id, []).append(event)
        if events:
            metrics.BATCH_SIZE.observe(len(produced))
            metrics.GENERATION_TOKENS.inc(len(events))
        for request_id, tokens in produced.items():
            tracked = self._requests.get(request_id)
            if tracked is None:
                continue
            if tracked.last_token_at is None:
                # A request's first token comes alone, from its prefill.
                metrics.QUEUE_TIME.observe(started - tracked.request.received_at)
                metrics.TIME_TO_FIRST_TOKEN.observe(now - tracked.request.received_at)
                metrics.PROMPT_TOKENS.inc(len(tracked.request.prompt))
            else:
                metrics.TOKENS_PER_PASS.observe(len(tokens))
                for _ in tokens:
                    metrics.INTER_TOKEN_LATENCY.observe((now - tracked.last_token_at) / len(tokens))
            tracked.last_token_at = now
            last = tokens[-1]
            if last.finished:
                del self._requests[request_id]
                self._release(tracked)
            text = "".join(event.text for event in tokens)
            _deliver(tracked, Chunk(text, len(tokens), last.finish_reason, sum(event.drafted for event in tokens)))

    def _fail(self, loaded: Loaded) -> None:
        """Fail every request of an engine whose step raised; a current engine is replaced by a fresh one
        over the same weights, since a failed step leaves the old one's batch undefined."""
        fresh = None
        if self._current is loaded:
            fresh = Loaded(loaded.engine.fresh(), loaded.info, loaded.draft)
        with self._cond:
            queued = [t for t in self._inbox if t.loaded is loaded]
            self._inbox = [t for t in self._inbox if t.loaded is not loaded]
            if fresh is not None and self._current is loaded:
                self._current = fresh
                self._held = 0
        running = [t for t in self._requests.values() if t.loaded is loaded]
        for tracked in running:
            del self._requests[tracked.request.request_id]
        for tracked in running + queued:
            _deliver(tracked, Failed("generation_failed"))
        self._active.remove(loaded)


def _speculation_counts(planner: Planner | None) -> tuple[Counter, Counter]:
    """The draft tokens an engine has checked and kept so far, by source."""
    if planner is None:
        return Counter(), Counter()
    return Counter(planner.stats.proposed), Counter(planner.stats.accepted)


def _count_speculation(planner: Planner | None, before: tuple[Counter, Counter]) -> None:
    """Add what a step checked and kept to the counters."""
    proposed, accepted = _speculation_counts(planner)
    for counter, now, then in (
        (metrics.SPECULATION_PROPOSED, proposed, before[0]),
        (metrics.SPECULATION_ACCEPTED, accepted, before[1]),
    ):
        for source, count in (now - then).items():
            counter.labels(source).inc(count)


def _deliver(tracked: Tracked, message: object) -> None:
    try:
        tracked.sink(message)
    except RuntimeError:
        # The worker's event loop is closing: nobody is left to read this request's messages.
        log.debug("dropped a message for request %s", tracked.request.request_id)
