"""Files that several programs share: one safe way to open a file another process writes, and the lock
that gives a folder to one process at a time.

A run folder is written by the trainer and read by the service, and anyone with access to it can put
anything there under an expected name: a FIFO (whose plain open waits for a writer, forever), a device
(whose reads never end), a socket, a folder, a symlink loop. `open_regular_file` opens without blocking
and reads nothing until the descriptor is known to be a regular file.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(OSError):
    """A path that names a FIFO, folder, device or socket where a regular file was expected."""


def open_regular_file(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file; NotRegularFile otherwise, or the OSError of the open
    (FileNotFoundError, ELOOP for a symlink loop, EACCES...).

    Checked before opening (a socket cannot be opened at all) and again on the descriptor, opened without
    blocking (the path could be swapped between the two; a regular file's reads never block anyway).
    """
    _check_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except NotRegularFile:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kinds = {stat.S_ISDIR: "folder", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket", stat.S_ISCHR: "device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "device")
    raise NotRegularFile(f"{path}: not a regular file but a {kind}")


class FolderInUse(Exception):
    """Another live process holds the folder."""


def lock_folder(folder: Path, name: str, in_use: str) -> int:
    """Take the lock `folder/name` for this process and write its PID there; return the descriptor, whose
    closing lets go. If another process holds it: FolderInUse(`in_use` formatted with {holder}, its PID, and
    {folder}).

    An flock, which the kernel releases when the holder ends, however it ends: a SIGKILLed holder never
    keeps the folder from the next process.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FolderInUse(in_use.format(holder=holder, folder=folder)) from None
    # Emptied first: a PID that cannot be written (a full disk) leaves none rather than a dead holder's.
    os.ftruncate(fd, 0)
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the folder is held all the same; a contender names no PID
    return fd
