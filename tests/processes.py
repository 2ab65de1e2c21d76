"""Every process the tests start, tied to the test run so that none outlives it.

`spawn`, `run` and `spawn_function` start a child in a session of its own (a test can signal its whole
group) that the kernel kills when the pytest process dies, however it dies: a pytest-timeout, Ctrl-C or a
crash cannot leave a trainer or a service running for hours. Its hook, which tests/conftest.py
imports, also fails the session if any process started here, or anything else below pytest, is still alive
at its end.

The parent-death signal follows the thread that forked the child: spawn long-lived children from the
test's own thread, not from a worker thread that ends before them.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing as mp
import os
import signal
import subprocess
from collections.abc import Callable
from multiprocessing import resource_tracker

import psutil
import pytest

from service.signals import die_with_parent

_started: list[subprocess.Popen] = []


def _detach_and_die_with(parent_pid: int, then: Callable[[], None] | None) -> None:
    os.setsid()
    die_with_parent(parent_pid, signal.SIGKILL)
    if then is not None:
        then()


def spawn(argv: list[str], preexec_fn: Callable[[], None] | None = None, **popen) -> subprocess.Popen:
    """`subprocess.Popen(argv, **popen)`, killed with the test run; `preexec_fn` runs after the tie is made."""
    tie = functools.partial(_detach_and_die_with, os.getpid(), preexec_fn)
    process = subprocess.Popen(argv, preexec_fn=tie, **popen)
    _started.append(process)
    return process


def run(
    argv: list[str], timeout: float = 600, preexec_fn: Callable[[], None] | None = None, **popen
) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, **popen)` for a child that must finish within `timeout` seconds."""
    tie = functools.partial(_detach_and_die_with, os.getpid(), preexec_fn)
    return subprocess.run(argv, preexec_fn=tie, timeout=timeout, **popen)


def spawn_function(target: Callable[..., None], *args) -> mp.Process:
    """`target(*args)` in a Python process started by multiprocessing's spawn, for arguments only it can
    pass (shared memory made by a spawn context), killed with the test run like `spawn`'s children."""
    process = mp.get_context("spawn").Process(target=_tied, args=(os.getpid(), target, *args), daemon=True)
    process.start()
    return process


def _tied(parent_pid: int, target: Callable[..., None], *args) -> None:
    _detach_and_die_with(parent_pid, functools.partial(target, *args))


def stop(*children: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM every child at once, then wait for each; SIGKILL one that overstays `timeout`."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def tree(pid: int) -> list[psutil.Process]:
    """`pid` and every live process below it."""
    root = psutil.Process(pid)
    return [p for p in (root, *root.children(recursive=True)) if _running(p)]


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU time of the processes that still run."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _stop_resource_tracker() -> None:
    """multiprocessing's resource tracker, which its spawn context starts in pytest, lives until pytest
    exits: it is stopped like every process a test starts, once what it tracks is gone. `_stop` is
    private CPython: a Python without it fails every session here, by name."""
    gc.collect()
    resource_tracker._resource_tracker._stop()


def survivors() -> list[str]:
    """Kill and describe every process below this one that is still alive (zombies are reaped)."""
    for process in _started:
        process.poll()
    alive = [p for p in psutil.Process().children(recursive=True) if _running(p)]
    described = []
    for child in alive:
        try:
            described.append(f"{child.pid} {' '.join(child.cmdline())[:200]}")
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return described


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# Last: after Ctrl-C (or a SIGTERM turned into one) pytest tears the fixtures down in its own
# sessionfinish, and they must stop what they started (dockerd its containers) before anything is killed.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _stop_resource_tracker()
    leaked = survivors()
    if leaked:
        session.config.get_terminal_writer().line(
            "processes left running by the tests (now killed):\n  " + "\n  ".join(leaked), red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
