"""An inference worker, assembled in one place: loader, scheduler, checkpoint watchers (the served model's
and the draft model's), cancel listener, heartbeat.

`start_worker` runs once in each spawned worker process (from the LitAPI's `setup`); `Worker.generate`
is what the LitAPI's `predict` streams for each request.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator

import torch

from model import Tokenizer
from model.speculation import SOURCES
from service import bridge, metrics, signals
from service.loading import Draft, Loaded, ModelLoader
from service.logs import configure_logging
from service.messages import Chunk, GenerationRequest, Refused, merge_chunks
from service.scheduler import Scheduler
from service.settings import ServiceSettings
from service.status import HEARTBEAT_INTERVAL, StatusBoard
from service.watcher import CheckpointWatcher

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, scheduler: Scheduler, stream_interval: float):
        self.scheduler = scheduler
        self.stream_interval = stream_interval

    async def generate(self, request: GenerationRequest) -> AsyncIterator[object]:
        """The scheduler's answer to `request`, then its chunks, grouped as `stream_interval` allows."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        answer = self.scheduler.submit(request, lambda message: loop.call_soon_threadsafe(inbox.put_nowait, message))
        yield answer
        if isinstance(answer, Refused):
            return
        # Every message costs a trip through LitServe's queues, about as much CPU as a small model's decode
        # step: tokens produced within stream_interval of the previous message, or while it was being sent,
        # travel together. The first token and the last are never held back.
        sent_at = -math.inf
        while True:
            messages = [await inbox.get()]
            while not _ends(messages[-1]) and (left := sent_at + self.stream_interval - loop.time()) > 0:
                try:
                    messages.append(await asyncio.wait_for(inbox.get(), left))
                except TimeoutError:
                    break
            while not inbox.empty():
                messages.append(inbox.get_nowait())
            for message in merge_chunks(messages):
                yield message
                if _ends(message):
                    return
            sent_at = loop.time()


def _ends(message) -> bool:
    """Whether `message` is a request's last (a finished chunk, or a failure)."""
    return not isinstance(message, Chunk) or message.finish_reason is not None


def start_worker(settings: ServiceSettings, board: StatusBoard, controls: list, request_queue, device: str) -> Worker:
    """Load what there is to serve, start the worker's threads and say so on the status board."""
    signals.ignore_interrupts()
    signals.die_with_parent(board.main_pid)
    configure_logging(settings.log_level)
    metrics.count_storage_failures(board)
    worker_id = bridge.process_index()
    previous = board.claim(worker_id)
    threading.Thread(target=_heartbeat, args=(board, worker_id), name="heartbeat", daemon=True).start()
    if previous:
        metrics.forget_process(previous)
        bridge.unblock_dead_workers_get(request_queue)
    torch.set_num_threads(settings.worker_threads(board.num_workers))
    # Checkpoints are rebuilt on the meta device, whose weight init imports torch._dynamo on first use (a
    # second or two): pay that now rather than between a checkpoint's publication and its serving.
    importlib.import_module("torch._dynamo")
    torch_device = torch.device(device)
    loader = ModelLoader(
        torch_device, settings.dtype, settings.quantize, settings.pack_weights, Tokenizer(), settings.max_batch_size,
        settings.batch_invariant, settings.fixed_draft_length,
    )  # fmt: skip
    scheduler = Scheduler(worker_id, settings.max_queued_requests, board, str(settings.checkpoint_path))
    drafts = _draft_watcher(settings, loader, scheduler, board, worker_id)
    if not settings.batch_invariant and (settings.speculation or settings.draft_path):
        log.warning(
            "speculative decoding is off, whatever requests ask: it keeps tokens identical only with batch "
            "invariance, which --no-batch-invariant drops%s",
            f" (the draft checkpoint {settings.draft_path} is not loaded)" if settings.draft_path else "",
        )

    def install(loaded: Loaded) -> None:
        if drafts is not None and not drafts.started:
            # The draft takes the precision of the first model loaded (--dtype auto chooses it then), and is
            # there before that model takes its first request.
            drafts.poll()
            drafts.start()
        log.info("worker %d serves %s on %s", worker_id, loader.weights, torch_device)
        scheduler.install(loaded)
        board.post(worker_id, loaded.info, loader.dtype_name)
        metrics.MODEL_STEP.set(math.nan if loaded.info.step is None else loaded.info.step)
        metrics.MODEL_VAL_LOSS.set(math.nan if loaded.info.val_loss is None else loaded.info.val_loss)
        metrics.MODEL_DTYPE.labels(loader.dtype_name).set(1)

    watcher = CheckpointWatcher(
        settings.checkpoint_path, settings.poll_interval, settings.load_timeout, loader.checkpoint, install
    )
    for result in metrics.RELOAD_RESULTS:
        metrics.RELOADS.labels(result)
        metrics.DRAFT_RELOADS.labels(result)
    for source in SOURCES:
        metrics.SPECULATION_PROPOSED.labels(source)
        metrics.SPECULATION_ACCEPTED.labels(source)
    metrics.RUNNING.set(0)
    metrics.WAITING.set(0)
    # A checkpoint that is already there is loaded before the worker reports ready.
    if not watcher.poll() and settings.init:
        log.info("no checkpoint yet; serving %s until one appears", settings.init)
        install(loader.pretrained(settings.init))
    if scheduler.serving is None:
        board.post(worker_id, None)
    scheduler.start()
    watcher.start()
    threading.Thread(target=_take_cancels, args=(controls[worker_id], scheduler), name="cancels", daemon=True).start()
    return Worker(scheduler, settings.stream_interval)


def _draft_watcher(
    settings: ServiceSettings, loader: ModelLoader, scheduler: Scheduler, board: StatusBoard, worker_id: int
) -> CheckpointWatcher | None:
    """The watcher of --draft-checkpoint, if the service drafts with a model."""
    if settings.draft_path is None or not settings.batch_invariant:
        return None

    def install(draft: Draft) -> None:
        scheduler.set_draft(draft)
        board.post_draft(worker_id, draft.info)

    return CheckpointWatcher(
        settings.draft_path, settings.poll_interval, settings.load_timeout, loader.draft, install,
        kind="draft checkpoint", reloads=metrics.DRAFT_RELOADS,
    )  # fmt: skip


def _heartbeat(board: StatusBoard, worker_id: int) -> None:
    """Tell the HTTP processes that this worker still runs, idle or busy: a stopped or frozen one is then seen
    within seconds, not only once it holds requests. A write to shared memory twice a second."""
    while True:
        board.heartbeat(worker_id)
        time.sleep(HEARTBEAT_INTERVAL)


def _take_cancels(control, scheduler: Scheduler) -> None:
    """LitServe cannot tell a worker that a client left: the HTTP processes say so on this queue."""
    while True:
        scheduler.cancel(control.get())
