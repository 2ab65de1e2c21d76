"""Signals LitServe leaves to us: dying with the parent process, SIGTERM as Ctrl-C, Ctrl-C ignored by workers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies, even by SIGKILL.

    Without it LitServe's workers and HTTP servers outlive a killed main process and keep serving.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def forked_child(parent_pid: int) -> None:
    """For processes forked from the main one: die with it, and leave SIGTERM to its default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


def ignore_interrupts() -> None:
    """Ctrl-C signals the whole process group; inference workers must outlive the HTTP servers' drain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupt_on_sigint_and_sigterm() -> None:
    """Make SIGTERM take LitServe's Ctrl-C path, its only graceful shutdown; and Ctrl-C take it too in a
    process started with SIGINT ignored (a script's background job): Python then leaves SIGINT ignored,
    while the HTTP servers (uvicorn handles SIGINT itself) drained and exited, and were started again."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
