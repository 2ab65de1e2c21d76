"""Shared memory where every service process says what it is and what it serves.

Made in the main process before LitServe starts anything: forked HTTP servers inherit it and spawned
inference workers receive it pickled with the LitAPI, which multiprocessing allows for shared memory
only while spawning (hence the spawn context). Each worker writes only its own slot; readers take
the lock so a slot is never seen half-written. The HTTP processes read it to answer /health, to
notice a dead or stalled worker, and to label the per-process metrics.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
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
    ]


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


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        return pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class StatusBoard:
    def __init__(self, workers: int, api_servers: int):
        ctx = mp.get_context("spawn")
        self.main_pid = os.getpid()
        self._workers = ctx.Array(_Slot, workers)
        self._api_pids = ctx.Array(ctypes.c_int, api_servers)
        # Processes whose metrics files could not be written (a full disk under --metrics-dir).
        self.metrics_failures = ctx.Value(ctypes.c_int, 0)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    # Written by inference worker `worker_id`.

    def claim(self, worker_id: int) -> int:
        """Take a worker's slot for this process; return the pid of its previous holder (0 if none)."""
        with self._workers.get_lock():
            slot = self._workers[worker_id]
            previous = slot.pid
            slot.pid, slot.status, slot.has_step, slot.busy = os.getpid(), Status.STARTING, False, False
        return previous

    def post(self, worker_id: int, model: ModelInfo | None, dtype: str = "") -> None:
        with self._workers.get_lock():
            slot = self._workers[worker_id]
            slot.status = Status.READY if model else Status.WAITING
            slot.has_step = model is not None and model.step is not None
            slot.step = model.step if slot.has_step else 0
            slot.val_loss = math.nan if model is None or model.val_loss is None else model.val_loss
            slot.loaded_at = time.time() if model else math.nan
            slot.checkpoint = (model.checkpoint if model else "").encode()[:63]
            slot.dtype = dtype.encode()[:7]

    def progress(self, worker_id: int, busy: bool) -> None:
        """The worker's scheduler advanced its requests (or has none left)."""
        with self._workers.get_lock():
            slot = self._workers[worker_id]
            slot.busy, slot.progress_at = busy, time.monotonic()

    # Written by HTTP server `server_id`.

    def claim_api(self, server_id: int) -> int:
        """Take an HTTP server's slot for this process; return the pid of its previous holder (0 if none)."""
        previous, self._api_pids[server_id] = self._api_pids[server_id], os.getpid()
        return previous

    # Read by anyone.

    def workers(self) -> list[WorkerView]:
        with self._workers.get_lock():
            slots = [
                (s.pid, s.status, s.has_step, s.step, s.val_loss, s.loaded_at, s.checkpoint, s.dtype, s.busy,
                 s.progress_at)
                for s in self._workers
            ]  # fmt: skip
        now = time.monotonic()
        return [
            WorkerView(
                worker_id,
                pid,
                Status(status) if alive(pid) else Status.STARTING,
                step if has_step else None,
                None if math.isnan(val_loss) else val_loss,
                None if math.isnan(loaded_at) or not loaded_at else loaded_at,
                checkpoint.decode(errors="replace"),
                dtype.decode(errors="replace"),
                now - progress_at if busy else 0.0,
            )
            for worker_id, (pid, status, has_step, step, val_loss, loaded_at, checkpoint, dtype, busy, progress_at)
            in enumerate(slots)
        ]  # fmt: skip

    def worker(self, worker_id: int) -> WorkerView:
        return self.workers()[worker_id]

    def roles(self) -> dict[int, str]:
        """Role of each known service process, for per-process metrics."""
        roles = {pid: "api" for pid in self._api_pids if pid}
        roles.update({view.pid: "worker" for view in self.workers() if view.pid})
        return roles
