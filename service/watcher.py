"""Polling the served checkpoint file and loading each new version in the background."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service import metrics
from service.scheduler import Loaded

log = logging.getLogger(__name__)


class CheckpointWatcher:
    """Calls `install` with every new version of `path` that `load` accepts.

    The trainer publishes with os.replace, so a new version is a new inode; size and mtime also
    catch writers that rewrite in place. A version that fails to load is logged, counted and not
    retried; the next version is picked up as usual.
    """

    def __init__(self, path: Path, interval: float, load: Callable[[Path], Loaded], install: Callable[[Loaded], None]):
        self.path = path
        self.interval = interval
        self._load = load
        self._install = install
        self._seen: tuple[int, int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)

    def poll(self) -> bool:
        """Load and install the file if it changed since the last poll; return whether it was installed."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("cannot check checkpoint %s: %s", self.path, e)
            return False
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if version == self._seen:
            return False
        self._seen = version
        try:
            loaded = self._load(self.path)
        except Exception as e:  # whatever the file holds, the worker keeps serving what it has
            metrics.RELOADS.labels("failure").inc()
            log.error("refused checkpoint %s, still serving the previous model: %s", self.path, e)
            return False
        metrics.RELOADS.labels("success").inc()
        log.info("loaded checkpoint %s (step %s, val_loss %s)", self.path, loaded.info.step, loaded.info.val_loss)
        self._install(loaded)
        return True

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.poll()
