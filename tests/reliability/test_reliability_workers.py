"""Inference workers that die, again and again, with requests in flight and arriving during the outage.

tests/service/test_service_lifecycle.py kills a worker once under two /predict requests. Here workers
die by several signals in a row, under /v1/completions (whole and streamed) and /predict, while new
requests arrive before the replacement is up: every request gets a clear answer, none hangs, readiness
drops while no worker serves, and the service recovers each time without a restart.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from reliabilitykit import SCALE, wait_idle
from servicekit import publish, wait_for

DEATHS = [signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT]
LONG = 1000  # tokens: the requests are surely still running when the worker dies


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=5)
    # A request the dead worker's last queue read took is lost: it fails after the queue timeout.
    return launch_for_module(checkpoint_dir, "--max-batch-size", "4", "--queue-timeout", "10")


def worker_pid(service) -> int | None:
    pids = service.metrics().pids("worker")
    return pids[0] if pids else None


def whole(service, path: str, body: dict) -> httpx.Response:
    return httpx.post(service.url + path, json=body, timeout=120.0)


def streamed(service, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", service.url + path, json={**body, "stream": True}, timeout=120.0) as response:
        assert response.status_code == 200, response.read()
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def assert_worker_lost(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "worker_unavailable"


def test_dead_workers_fail_their_requests_clearly_and_are_replaced(service, figures):
    completion = {"model": "gpt", "prompt": "Doomed", "max_tokens": LONG}
    deaths = [DEATHS[i % len(DEATHS)] for i in range(SCALE.worker_kills)]
    outage_answers = []
    for death in deaths:
        victim = worker_pid(service)
        with ThreadPoolExecutor(4) as pool:
            in_flight = [
                pool.submit(whole, service, "/v1/completions", completion),
                pool.submit(streamed, service, "/v1/completions", completion),
                pool.submit(whole, service, "/predict", {"prompt": "Doomed too", "max_new_tokens": LONG}),
            ]
            wait_for(lambda: service.metrics().get("gpt_num_requests_running") == 3, 30, message="3 running requests")
            os.kill(victim, death)
            # Readiness drops as soon as the worker is gone (or a replacement already took its place).
            wait_for(lambda: service.health().status_code == 503 or worker_pid(service) != victim, 30,
                     message="readiness to drop")  # fmt: skip
            arriving = pool.submit(whole, service, "/predict", {"prompt": "Meanwhile", "max_new_tokens": 4})
            plain, events, plain_predict = (future.result() for future in in_flight)
            outage_answers.append(arriving.result().status_code)

        assert_worker_lost(plain)
        assert_worker_lost(plain_predict)
        assert events[-1] == "data: [DONE]" and '"worker_unavailable"' in events[-2], events[-3:]
        # Sent while no worker served: answered once the replacement is up, or a clear 503 (see RELIABILITY.md).
        assert outage_answers[-1] in (200, 503)
        wait_for(lambda: service.health().status_code == 200, 120, interval=0.2, message="a replacement worker")
        assert worker_pid(service) not in (None, victim)
        assert service.predict(prompt="Back", max_new_tokens=3)["model"]["step"] == 5
        wait_idle(service)

    figures.update(
        worker_deaths=len(outage_answers),
        signals=[death.name for death in deaths],
        requests_arriving_during_outage={str(s): outage_answers.count(s) for s in sorted(set(outage_answers))},
    )
