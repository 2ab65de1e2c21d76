"""Helpers of the reliability tests: how big each run is, and waiting for the workers to fall idle."""

from __future__ import annotations

import os
from dataclasses import dataclass

from servicekit import Scrape, Service, wait_for


@dataclass(frozen=True)
class Scale:
    fuzz_cases: int  # per endpoint
    soak_requests: int
    soak_concurrency: int
    trainer_kills: int
    worker_kills: int


SOAK = os.environ.get("RELIABILITY_SOAK") == "1"
SCALE = Scale(1000, 2000, 32, 20, 5) if SOAK else Scale(40, 80, 16, 3, 1)


def wait_idle(service: Service, timeout: float = 30.0) -> Scrape:
    """The first scrape in which no request runs or waits in any worker."""

    def idle():
        scrape = service.metrics()
        running = scrape.get("gpt_num_requests_running") + scrape.get("gpt_num_requests_waiting")
        return running == 0 and scrape

    return wait_for(idle, timeout, message="every request to leave the workers")
