"""Polling the served checkpoint file and loading each new version in the background, within a time bound."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from service import metrics
from service.loading import Loaded

log = logging.getLogger(__name__)


class CheckpointWatcher:
    """Calls `install` with every new version of `path` that `load` accepts within `timeout` seconds.

    The trainer publishes with os.replace, so a new version is a new inode; size and mtime also catch
    writers that rewrite in place. A version that fails to load (or takes too long: a file on a hung
    network mount) is logged with the reason, counted, and not tried again; the previous model keeps
    serving and the next version is picked up as usual. A load that overran keeps its thread, but its
    result is thrown away.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        timeout: float,
        load: Callable[[Path], Loaded],
        install: Callable[[Loaded], None],
    ):
        self.path = path
        self.interval = interval
        self.timeout = timeout
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
        outcome: list = []
        loader = threading.Thread(target=self._attempt, args=(outcome,), name="checkpoint-load", daemon=True)
        loader.start()
        loader.join(self.timeout)
        if loader.is_alive():
            metrics.RELOADS.labels("timeout").inc()
            log.error(
                "loading checkpoint %s took longer than %g s; gave up, still serving the previous model",
                self.path, self.timeout,
            )  # fmt: skip
            return False
        if isinstance(outcome[0], Exception):
            metrics.RELOADS.labels("failure").inc()
            log.error("refused checkpoint %s, still serving the previous model: %s", self.path, outcome[0])
            return False
        loaded = outcome[0]
        metrics.RELOADS.labels("success").inc()
        log.info("loaded checkpoint %s (step %s, val_loss %s)", self.path, loaded.info.step, loaded.info.val_loss)
        self._install(loaded)
        return True

    def _attempt(self, outcome: list) -> None:
        try:
            outcome.append(self._load(self.path))
        except Exception as e:  # whatever the file holds, the worker keeps serving what it has
            outcome.append(e)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.poll()
