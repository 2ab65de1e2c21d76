"""Process plumbing LitServe leaves out: signals and dying with the parent."""

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


def own_session_ending_with(parent_pid: int) -> None:
    """For a supervisor's child (a `preexec_fn`): a session of its own, so that Ctrl-C reaches it only
    through the supervisor, and a graceful SIGTERM if the supervisor is killed outright."""
    os.setsid()
    die_with_parent(parent_pid, signal.SIGTERM)


def forked_child(parent_pid: int) -> None:
    """For processes forked from the main one: die with it, and leave SIGTERM to its default."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent_pid)


def ignore_interrupts() -> None:
    """Ctrl-C signals the whole process group; inference workers must outlive the HTTP servers' drain."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM take LitServe's Ctrl-C path, its only graceful shutdown."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


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
