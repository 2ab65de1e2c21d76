"""Shared memory where every inference worker posts its pid and what it serves, for the HTTP processes.

The board is created in the main process before LitServe starts anything: forked HTTP servers
inherit it and spawned inference workers receive it pickled with the LitAPI, which multiprocessing
allows for shared memory only while spawning (hence the spawn context). Each worker writes only its
own slot; readers take the lock so a slot is never seen half-written.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import os
from dataclasses import dataclass
from enum import IntEnum

from service.messages import ModelInfo
from service.proctree import alive


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
    ]


@dataclass(frozen=True)
class WorkerView:
    worker_id: int
    pid: int
    status: Status
    step: int | None
    val_loss: float | None


class Board:
    def __init__(self, workers: int, api_servers: int):
        ctx = mp.get_context("spawn")
        self.main_pid = os.getpid()
        self._workers = ctx.Array(_Slot, workers)
        self._api_pids = ctx.Array(ctypes.c_int, api_servers)

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    # Written by inference worker `worker_id`.

    def claim(self, worker_id: int) -> int:
        """Take a worker's slot for this process; return the pid of its previous holder (0 if none)."""
        with self._workers.get_lock():
            slot = self._workers[worker_id]
            previous = slot.pid
            slot.pid, slot.status, slot.has_step = os.getpid(), Status.STARTING, False
        return previous

    def post(self, worker_id: int, model: ModelInfo | None) -> None:
        with self._workers.get_lock():
            slot = self._workers[worker_id]
            slot.status = Status.READY if model else Status.WAITING
            slot.has_step = model is not None and model.step is not None
            slot.step = model.step if slot.has_step else 0
            slot.val_loss = float("nan") if model is None or model.val_loss is None else model.val_loss

    # Written by HTTP server `server_id`.

    def claim_api(self, server_id: int) -> None:
        self._api_pids[server_id] = os.getpid()

    # Read by anyone.

    def workers(self) -> list[WorkerView]:
        with self._workers.get_lock():
            slots = [(s.pid, s.status, s.has_step, s.step, s.val_loss) for s in self._workers]
        return [
            WorkerView(
                worker_id,
                pid,
                Status(status) if alive(pid) else Status.STARTING,
                step if has_step else None,
                None if math.isnan(val_loss) else val_loss,
            )
            for worker_id, (pid, status, has_step, step, val_loss) in enumerate(slots)
        ]

    def worker_pid(self, worker_id: int) -> int:
        with self._workers.get_lock():
            return self._workers[worker_id].pid

    def roles(self) -> dict[int, str]:
        """Role of each known service process, for per-process metrics."""
        roles = {pid: "api" for pid in self._api_pids if pid}
        roles.update({view.pid: "worker" for view in self.workers() if view.pid})
        return roles


class RegisterApiServer:
    """ASGI middleware that posts each HTTP server's pid on the board when the server starts.

    LitServe forks its HTTP servers and gives them no start hook; the ASGI lifespan startup is the
    first thing each one runs, with LITSERVE_WORKER_ID set to its index.
    """

    def __init__(self, app, board):
        self.app = app
        self.board = board

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            self.board.claim_api(int(os.environ.get("LITSERVE_WORKER_ID", "0")))
        await self.app(scope, receive, send)
