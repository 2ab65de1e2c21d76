"""The LitAPI: what each inference worker runs.

LitServe's async streaming loop calls `predict` once per request, as an asyncio task. `predict`
hands the request to the worker's scheduler thread (which owns the engines and batches every
request of the worker together) and yields the scheduler's messages as they come.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import multiprocessing as mp
import os
import threading
import uuid

import litserve as ls
import torch

from model import Tokenizer, autocast_dtype
from service import metrics, signals
from service.board import Board
from service.loading import ModelLoader
from service.logs import configure_logging
from service.messages import Chunk, GenerationRequest, Rejected, merge_chunks
from service.scheduler import Loaded, Scheduler
from service.settings import ServiceSettings
from service.spec import GenerationSpec
from service.watcher import CheckpointWatcher

log = logging.getLogger(__name__)


class GenerationAPI(ls.LitAPI):
    def __init__(self, settings: ServiceSettings, board: Board):
        ctx = mp.get_context("spawn")
        # One cancel channel per worker: LitServe has no way to tell a worker that a client left.
        self.controls = [ctx.Queue() for _ in range(board.num_workers)]
        super().__init__(stream=True, enable_async=True, spec=GenerationSpec(settings, board, self.controls))
        self.settings = settings
        self.board = board

    def setup(self, device: str) -> None:
        signals.ignore_interrupts()
        signals.die_with_parent(self.board.main_pid)
        configure_logging(self.settings.log_level)
        self.worker_id = int(os.environ["LITSERVE_WORKER_ID"])
        previous = self.board.claim(self.worker_id)
        if previous:
            self._replace(previous)
        torch.set_num_threads(self.settings.worker_threads(self.board.num_workers))

        # Checkpoints are rebuilt on the meta device, whose weight init imports torch._dynamo on first
        # use (a second or two): pay that now rather than between a checkpoint's publication and its serving.
        importlib.import_module("torch._dynamo")
        torch_device = torch.device(device)
        loader = ModelLoader(
            torch_device,
            autocast_dtype(torch_device, self.settings.dtype),
            self.settings.quantize,
            self.settings.pack_weights,
            Tokenizer(),
            self.settings.max_batch_size,
        )
        log.info("worker %d serves %s on %s", self.worker_id, loader.weights, torch_device)
        self.scheduler = Scheduler(
            self.worker_id,
            max_queued=self.settings.max_queued_requests,
            batch_wait=self.settings.batch_wait,
            unavailable=self.settings.waiting_message,
            rebuild=loader.rebuild,
        )
        self.watcher = CheckpointWatcher(
            self.settings.checkpoint_dir / self.settings.checkpoint_name,
            self.settings.poll_interval,
            loader.checkpoint,
            self._install,
        )
        for result in ("success", "failure"):
            metrics.RELOADS.labels(result)
        metrics.RUNNING.set(0)
        metrics.WAITING.set(0)
        # A checkpoint that is already there is loaded before the worker reports ready.
        if not self.watcher.poll() and self.settings.init:
            log.info("no checkpoint yet; serving %s until one appears", self.settings.init)
            self._install(loader.pretrained(self.settings.init))
        self.board.post(self.worker_id, self.scheduler.serving)
        self.scheduler.start()
        self.watcher.start()
        threading.Thread(target=self._take_cancels, name="cancels", daemon=True).start()

    async def decode_request(self, request: GenerationRequest) -> GenerationRequest:
        # The HTTP process already validated and tokenized the request.
        return request

    async def predict(self, request: GenerationRequest):
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        answer = self.scheduler.submit(request, lambda message: loop.call_soon_threadsafe(inbox.put_nowait, message))
        yield answer
        if isinstance(answer, Rejected):
            return
        # Every message costs a trip through LitServe's queues, about as much CPU as a small model's
        # decode step: tokens produced within stream_interval of the previous message, or while it
        # was being sent, travel together. The first token and the last are never held back.
        interval = self.settings.stream_interval
        sent_at = -math.inf
        while True:
            messages = [await inbox.get()]
            while not _ends(messages[-1]) and (left := sent_at + interval - loop.time()) > 0:
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

    async def encode_response(self, output):
        async for message in output:
            yield message

    def _install(self, loaded: Loaded) -> None:
        self.scheduler.install(loaded)
        self.board.post(self.worker_id, loaded.info)
        metrics.MODEL_STEP.set(math.nan if loaded.info.step is None else loaded.info.step)
        metrics.MODEL_VAL_LOSS.set(math.nan if loaded.info.val_loss is None else loaded.info.val_loss)

    def _replace(self, previous: int) -> None:
        """Clean up after the dead worker whose slot this one took."""
        metrics.forget_process(previous)
        # The dead worker was almost surely blocked on LitServe's request queue, a Manager queue: that
        # get lives on in the manager process and would swallow the next request. Feed it an expired
        # one, which LitServe drops (answering its unknown id with a timeout nobody listens to).
        self.spec.request_queue.put((0, f"expired-{uuid.uuid4().hex}", float("-inf"), None))

    def _take_cancels(self) -> None:
        controls = self.controls[self.worker_id]
        while True:
            self.scheduler.cancel(controls.get())


def _ends(message) -> bool:
    """Whether `message` is a request's last (a finished chunk, or a failure)."""
    return not isinstance(message, Chunk) or message.finish_reason is not None
