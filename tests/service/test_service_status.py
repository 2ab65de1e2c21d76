"""The status board: a worker stopped or killed at any moment, even half-way through writing its slot,
never blocks the processes that read the board nor the worker that replaces it, and never shows them a
half-written slot. (With a lock shared between processes, a worker SIGKILLed while holding it hung
/health and its own replacement for good.)"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading

from processes import spawn_function
from servicekit import wait_for

from service.messages import ModelInfo
from service.status import Status, StatusBoard

STOPS = 200
KILLS = 3
READ_WITHIN = 30.0  # seconds: a read takes microseconds; one that waits this long waits on the writer


def write_forever(board: StatusBoard) -> None:
    """A worker's writes, as fast as they go: every slot it posts is whole only if step, loss and name agree."""
    board.claim(0)
    step = 0
    while True:
        step += 1
        board.post(0, ModelInfo(step=step, val_loss=float(step), checkpoint=f"step-{step}"), "bf16")
        board.progress(0, busy=step % 2 == 0)


def read(board: StatusBoard):
    """Worker 0's slot, read in a thread of its own so that a read blocked by the writer fails the test."""
    views = []
    thread = threading.Thread(target=lambda: views.append(board.workers()[0]), daemon=True)
    thread.start()
    thread.join(READ_WITHIN)
    assert views, f"reading the board waited {READ_WITHIN:g} s on a stopped or killed writer"
    view = views[0]
    # Between a writer's claim and its first post the slot has no step yet; every posted one is whole.
    if view.step is not None:
        assert view.val_loss == float(view.step) and view.checkpoint == f"step-{view.step}" and view.dtype == "bf16"
    return view


def start_writer(board: StatusBoard) -> mp.Process:
    writer = spawn_function(write_forever, board)
    wait_for(lambda: (view := read(board)).pid == writer.pid and view.step, 60, message="the writer to post")
    return writer


def test_a_stopped_or_killed_writer_never_blocks_readers_or_its_replacement():
    board = StatusBoard(workers=1, api_servers=1)
    rng = random.Random(0)
    for _ in range(KILLS):
        writer = start_writer(board)
        try:
            for _ in range(STOPS // KILLS):
                # Stopped after a random number of writes more, wherever it is in the next one.
                target = read(board).step + rng.randint(1, 50)
                wait_for(lambda: read(board).step >= target, 30, message="the writer to move on")
                os.kill(writer.pid, signal.SIGSTOP)
                try:
                    view = read(board)
                finally:
                    os.kill(writer.pid, signal.SIGCONT)
                assert view.pid == writer.pid and view.status is Status.READY
        finally:
            writer.kill()
            writer.join()
        # Killed mid-write: the slot still reads whole, as a dead worker's (status STARTING).
        dead = read(board)
        assert dead.pid == writer.pid and dead.status is Status.STARTING
