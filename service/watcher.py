"""Polling a checkpoint file (the served one, or the draft model's) and loading each new version in the
background, within a time bound."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter

from service import metrics
from service.loading import Draft, Loaded

log = logging.getLogger(__name__)


class CheckpointWatcher:
    """Calls `install` with every new version of `path` that `load` accepts within `timeout` seconds.

    The trainer publishes with os.replace, so a new version is a new inode; size and mtime also catch
    writers that rewrite in place. A version that fails to load (or takes too long: a file on a hung
    network mount) is logged with the reason, counted, and not tried again; the previous model keeps
    serving and the next version is picked up as usual. A load that overran keeps its thread, but its
    result is thrown away. `kind` names the file in the log and `reloads` counts the outcomes.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        timeout: float,
        load: Callable[[Path], Loaded | Draft],
        install: Callable[[Loaded | Draft], None],
        kind: str = "checkpoint",
        reloads: Counter = metrics.RELOADS,
    ):
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self._load = load
        self._install = install
        self.kind = kind
        self._reloads = reloads
        self._seen: tuple[int, int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)

    def poll(self) -> bool:
        """Load and install the file if it changed since the last poll; return whether it was installed."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as e:
            log.error("cannot check %s %s: %s", self.kind, self.path, e)
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
            self._reloads.labels("timeout").inc()
            log.error(
                "loading %s %s took longer than %g s; gave up, still serving the previous one",
                self.kind, self.path, self.timeout,
            )  # fmt: skip
            return False
        if isinstance(outcome[0], Exception):
            self._reloads.labels("failure").inc()
            log.error("refused %s %s, still serving the previous one: %s", self.kind, self.path, outcome[0])
            return False
        loaded = outcome[0]
        self._reloads.labels("success").inc()
        log.info("loaded %s %s (step %s, val_loss %s)", self.kind, self.path, loaded.info.step, loaded.info.val_loss)
        self._install(loaded)
        return True

    def _attempt(self, outcome: list) -> None:
        try:
            outcome.append(self._load(self.path))
        except Exception as e:  # whatever the file holds, the worker keeps serving what it has
            outcome.append(e)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.poll()
