"""Shared memory where every service process says what it is and what it serves.

Made in the main process before LitServe starts anything: forked HTTP servers inherit it and spawned
inference workers receive it pickled with the LitAPI, which multiprocessing allows for shared memory
only while spawning (hence the spawn context). The HTTP processes read it to answer /health, to
notice a dead, stalled (holding requests without progress) or unresponsive (no heartbeat) worker, and to
label the per-process metrics.

No process ever waits on another here: a lock shared between processes stays taken forever when its
holder is killed inside it (a worker SIGKILLed mid-step hung /health and its own replacement). Each
worker writes only its own slot, kept twice: a write fills the copy readers are not using and then
flips `current` to it, so a writer that dies or is stopped half-way leaves the published copy whole;
a reader copies the published one and tries again if `current` moved meanwhile.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass
from enum import IntEnum

import psutil

from service.messages import ModelInfo


class Status(IntEnum):
    STARTING = 0
    WAITING = 1  # up, but no model to serve yet
    READY = 2


class _Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int),
        ("status", ctypes.c_int),
        ("has_step", ctypes.c_bool),
        ("step", ctypes.c_longlong),
        ("val_loss", ctypes.c_double),
        ("loaded_at", ctypes.c_double),
        ("checkpoint", ctypes.c_char * 64),
        ("dtype", ctypes.c_char * 8),
        # Whether the worker holds requests, and when (time.monotonic) its scheduler last advanced them.
        ("busy", ctypes.c_bool),
        ("progress_at", ctypes.c_double),
        # When the worker last posted a heartbeat: time.monotonic (the same clock in every process), and the
        # time of day it was, to say so.
        ("heartbeat_at", ctypes.c_double),
        ("heartbeat_wall", ctypes.c_double),
        # The draft model of speculative decoding (an empty name: none).
        ("draft_checkpoint", ctypes.c_char * 64),
        ("draft_has_step", ctypes.c_bool),
        ("draft_step", ctypes.c_longlong),
        ("draft_val_loss", ctypes.c_double),
        ("draft_loaded_at", ctypes.c_double),
    ]


class _Published(ctypes.Structure):
    _fields_ = [("current", ctypes.c_uint64), ("copies", _Slot * 2)]


# A worker's asyncio thread, its scheduler thread and its heartbeat thread all write its slot.
_WRITING = threading.Lock()
# Each worker posts a heartbeat this often, busy or idle; one whose last is older than HEARTBEAT_TIMEOUT
# cannot take a request (stopped, frozen), whether or not it holds one.
HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 5.0


def _read(published: _Published) -> _Slot:
    while True:
        current = published.current
        slot = _Slot.from_buffer_copy(published.copies[current % 2])
        if published.current == current:
            return slot


def _write(published: _Published, **fields) -> None:
    with _WRITING:
        current = published.current
        slot = _Slot.from_buffer_copy(published.copies[current % 2])
        for name, value in fields.items():
            setattr(slot, name, value)
        published.copies[(current + 1) % 2] = slot
        published.current = current + 1


@dataclass(frozen=True)
class WorkerView:
    worker_id: int
    pid: int
    status: Status
    step: int | None
    val_loss: float | None
    loaded_at: float | None
    checkpoint: str
    dtype: str
    stalled_for: float  # seconds without progress while holding requests (0 when idle or moving)
    heartbeat_at: float  # when (time.time) the worker last posted a heartbeat
    silent_for: float  # seconds since then
    draft: ModelInfo | None  # the draft model it proposes with
    draft_loaded_at: float | None

    @property
    def unresponsive(self) -> bool:
        """A worker that started (it may be waiting for a checkpoint) and has not posted a heartbeat lately."""
        return self.status is not Status.STARTING and self.silent_for > HEARTBEAT_TIMEOUT


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _draft(slot: _Slot) -> ModelInfo | None:
    if not slot.draft_checkpoint:
        return None
    return ModelInfo(
        slot.draft_step if slot.draft_has_step else None,
        None if math.isnan(slot.draft_val_loss) else slot.draft_val_loss,
        slot.draft_checkpoint.decode(errors="replace"),
    )


class StatusBoard:
    def __init__(self, workers: int, api_servers: int):
        ctx = mp.get_context("spawn")
        self.main_pid = os.getpid()
        self._workers = ctx.Array(_Published, workers, lock=False)
        # Each HTTP server writes its own entry, one aligned int.
        self._api_pids = ctx.Array(ctypes.c_int, api_servers, lock=False)
        # Processes whose metrics files could not be written (a full disk under --metrics-dir). Its lock is
        # taken only by a process counting itself, once; readers read the int alone.
        self.metrics_failures = ctx.Value(ctypes.c_int, 0)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    # Written by inference worker `worker_id`.

    def claim(self, worker_id: int) -> int:
        """Take a worker's slot for this process; return the pid of its previous holder (0 if none)."""
        previous = _read(self._workers[worker_id]).pid
        _write(
            self._workers[worker_id],
            pid=os.getpid(),
            status=Status.STARTING,
            has_step=False,
            busy=False,
            heartbeat_at=time.monotonic(),
            heartbeat_wall=time.time(),
            draft_checkpoint=b"",
        )
        return previous

    def post(self, worker_id: int, model: ModelInfo | None, dtype: str = "") -> None:
        has_step = model is not None and model.step is not None
        _write(
            self._workers[worker_id],
            status=Status.READY if model else Status.WAITING,
            has_step=has_step,
            step=model.step if has_step else 0,
            val_loss=math.nan if model is None or model.val_loss is None else model.val_loss,
            loaded_at=time.time() if model else math.nan,
            checkpoint=(model.checkpoint if model else "").encode()[:63],
            dtype=dtype.encode()[:7],
        )

    def post_draft(self, worker_id: int, draft: ModelInfo) -> None:
        _write(
            self._workers[worker_id],
            draft_checkpoint=draft.checkpoint.encode()[:63],
            draft_has_step=draft.step is not None,
            draft_step=draft.step or 0,
            draft_val_loss=math.nan if draft.val_loss is None else draft.val_loss,
            draft_loaded_at=time.time(),
        )

    def progress(self, worker_id: int, busy: bool) -> None:
        """The worker's scheduler advanced its requests (or has none left)."""
        _write(self._workers[worker_id], busy=busy, progress_at=time.monotonic())

    def heartbeat(self, worker_id: int) -> None:
        """The worker's process runs (see HEARTBEAT_INTERVAL)."""
        _write(self._workers[worker_id], heartbeat_at=time.monotonic(), heartbeat_wall=time.time())

    # Written by HTTP server `server_id`.

    def claim_api(self, server_id: int) -> int:
        """Take an HTTP server's slot for this process; return the pid of its previous holder (0 if none)."""
        previous, self._api_pids[server_id] = self._api_pids[server_id], os.getpid()
        return previous

    # Read by anyone.

    def workers(self) -> list[WorkerView]:
        now = time.monotonic()
        return [
            WorkerView(
                worker_id,
                slot.pid,
                Status(slot.status) if alive(slot.pid) else Status.STARTING,
                slot.step if slot.has_step else None,
                None if math.isnan(slot.val_loss) else slot.val_loss,
                None if math.isnan(slot.loaded_at) or not slot.loaded_at else slot.loaded_at,
                slot.checkpoint.decode(errors="replace"),
                slot.dtype.decode(errors="replace"),
                now - slot.progress_at if slot.busy else 0.0,
                slot.heartbeat_wall,
                now - slot.heartbeat_at,
                _draft(slot),
                slot.draft_loaded_at if slot.draft_checkpoint else None,
            )
            for worker_id, slot in enumerate(_read(published) for published in self._workers)
        ]

    def worker(self, worker_id: int) -> WorkerView:
        return self.workers()[worker_id]

    def roles(self) -> dict[int, str]:
        """Role of each known service process, for per-process metrics."""
        roles = {pid: "api" for pid in self._api_pids if pid}
        roles.update({view.pid: "worker" for view in self.workers() if view.pid})
        return roles
