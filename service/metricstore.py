"""Metrics files that cannot kill a process when the disk under --metrics-dir fills up.

This module alone relies on prometheus_client's private behaviour (checked by
tests/service/test_service_internals.py):
- `prometheus_client.values.MmapedDict`, the class each process's multiprocess value files are made
  with (looked up by that name whenever a file is opened), its `_m`, `_f`, `_capacity` and `_used`
  attributes, and its `_init_value`, which grows a file by doubling `_capacity` with `truncate`.

prometheus_client grows its files with `truncate`, which makes them sparse: disk blocks are only taken
when a page of the mapping is first written, and on a full disk that write raises SIGBUS, which kills
the process (an HTTP server, an inference worker). Here a file is given its blocks with
posix_fallocate before any page of it is mapped, so a full disk is an ordinary OSError; the process
then keeps that file's values in memory (they no longer reach /metrics), logs it once and reports it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from prometheus_client import mmap_dict, values

log = logging.getLogger(__name__)


# The pid whose files failed (a forked child inherits the parent's memory but fails on its own), and who
# to tell about it.
_failed_in: int | None = None
_listener: Callable[[], None] | None = None


class _ReservedMmapedDict(mmap_dict.MmapedDict):
    def __init__(self, filename, read_mode=False):
        self._in_memory = False
        if not read_mode:
            try:
                with open(filename, "a+b") as f:
                    size = os.fstat(f.fileno()).st_size
                    try:
                        os.posix_fallocate(f.fileno(), 0, max(size, mmap_dict._INITIAL_MMAP_SIZE))
                    except OSError:
                        if size == 0:  # an empty file would break every scrape's reading of the folder
                            os.unlink(filename)
                        raise
            except OSError as error:
                self._f, self._fname, self._positions = None, filename, {}
                self._capacity, self._used = mmap_dict._INITIAL_MMAP_SIZE, 8
                self._m = bytearray(self._capacity)
                mmap_dict._pack_integer(self._m, 0, self._used)
                self._move_to_memory(error)
                return
        super().__init__(filename, read_mode)

    def _init_value(self, key):
        # The entry takes at most 4 + the key + 8 bytes of padding + 16; the parent doubles the capacity
        # until it fits. Take that room first: blocks on disk, or bytes in memory.
        needed = self._used + len(key.encode("utf-8")) + 28
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity > self._capacity and not self._in_memory:
            try:
                os.posix_fallocate(self._f.fileno(), 0, capacity)
            except OSError as error:
                memory = bytearray(self._m[: self._capacity])
                self._m.close()
                self._f.close()
                self._f, self._m = None, memory
                self._move_to_memory(error)
        if capacity > self._capacity and self._in_memory:
            self._m.extend(bytes(capacity - self._capacity))
            self._capacity = capacity
        super()._init_value(key)

    def _move_to_memory(self, error: OSError) -> None:
        global _failed_in
        self._in_memory = True
        if _failed_in != os.getpid():
            _failed_in = os.getpid()
            log.error(
                "cannot write metrics files in %s (%s): this process keeps its metrics in memory, missing from "
                "/metrics until it restarts; generation goes on",
                os.path.dirname(self._fname),
                error.strerror or error,
            )
            if _listener is not None:
                _listener()

    def close(self):
        if self._in_memory:
            self._m = None
        else:
            super().close()


def install() -> None:
    """Make every metrics file opened from now on take its disk blocks before it is mapped."""
    values.MmapedDict = _ReservedMmapedDict


def on_failure(listener: Callable[[], None]) -> None:
    """Call `listener` once when this process first fails to write a metrics file (now, if it already has)."""
    global _listener
    _listener = listener
    if _failed_in == os.getpid():
        listener()
