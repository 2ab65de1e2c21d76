"""SIGTERM and Ctrl-C ask the loop to stop after the current step, so `docker compose stop` loses nothing.

A second signal restores the default behaviour, so pressing Ctrl-C twice still ends a stuck run.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing last.pt", flush=True)
        signal.signal(signum, self._previous[signum])
