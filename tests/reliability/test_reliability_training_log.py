"""Whatever stands at metrics.jsonl in the checkpoint folder, `GET /v1/training` answers in JSON and never
stalls the service.

The route is open when no key is set and the page polls it every 5 s, so what the trainer's folder holds is
what a stranger can make the service read: a FIFO (whose plain open waits for a writer: it froze the whole
HTTP server), a folder or a symlink loop (plain-text 500s), a line of 200,000 brackets (a 500 on every poll
from then on), a log of millions of lines (each poll parsed a mebibyte on the event loop: /predict's p50
went from 36 ms to 6.6 s).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from reliabilitykit import SCALE
from servicekit import publish, wait_for

from service.page import MAX_POINTS, METRICS_FILE

POLLERS = 10  # pages open on the service
POLL_EVERY = 0.1  # seconds: fifty times the page's own rate
CLIENT_EVERY = 0.2  # seconds between the normal client's requests


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=2)
    return launch_for_module(checkpoint_dir)


@pytest.fixture
def log_path(service):
    path = service.checkpoint_dir / METRICS_FILE
    yield path
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


def training(service) -> httpx.Response:
    return httpx.get(service.url + "/v1/training", timeout=60.0)


def record(step: int) -> str:
    return json.dumps({"step": step, "loss": 4.0 - step * 1e-7}) + "\n"


def assert_serving(service) -> None:
    assert service.health().status_code == 200
    assert service.predict(prompt="Still here", max_new_tokens=2)["usage"]["completion_tokens"] == 2


def make_fifo(path):
    os.mkfifo(path)


def make_folder(path):
    path.mkdir()


def make_symlink_loop(path):
    os.symlink(path.name, path)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (make_fifo, "not a regular file but a FIFO"),
        (make_folder, "not a regular file but a folder"),
        (make_symlink_loop, "Too many levels of symbolic links"),
    ],
    ids=["FIFO", "folder", "symlink loop"],
)
def test_a_special_file_named_metrics_jsonl_is_a_json_error_and_blocks_nothing(service, log_path, make, reason,
                                                                             figures):  # fmt: skip
    make(log_path)
    for _ in range(2):  # the second poll too: nothing was left half-done
        response = training(service)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "training_log_unreadable" and reason in error["message"], error
        assert response.headers["retry-after"] == "5"
        assert_serving(service)
    assert "Traceback" not in service.log()
    figures[reason] = f"{response.status_code} {error['code']}, service serving"


def test_a_line_that_is_no_record_is_skipped_counted_and_passed(service, log_path, figures):
    hostile = ["[" * 200_000, "x" * 100_000, "not json", '{"step": 3, "loss": NaN}', '{"step": "4"}', "[]"]
    log_path.write_text(record(1) + "\n".join(hostile) + "\n" + record(2))

    def read_through() -> dict | None:
        response = training(service)
        assert response.status_code == 200, response.text
        return response.json()["complete"] and response.json()

    for _ in range(2):  # and on every poll after: the position moved past them
        body = wait_for(read_through, 30, message="the log to be read through")
        assert body["records"] == 2 and body["skipped"] == len(hostile)
        assert [step for step, _ in body["train"]] == [1, 2]
    assert_serving(service)
    figures.update(lines_skipped=body["skipped"])


def normal_latency(service) -> float:
    started = time.monotonic()
    response = httpx.post(service.url + "/predict", json={"prompt": "Hello", "max_new_tokens": 2}, timeout=120)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def normal_p50(service, count: int) -> float:
    """The p50 of `count` small /predict requests sent on a clock (CLIENT_EVERY apart), each on its own
    connection: a stall then delays every request sent during it, not just the one that met it."""
    with ThreadPoolExecutor(count) as clients:
        sent = []
        for _ in range(count):
            sent.append(clients.submit(normal_latency, service))
            threading.Event().wait(CLIENT_EVERY)
        return statistics.median(request.result() for request in sent)


def test_a_huge_growing_log_polled_by_many_pages_leaves_others_their_latency(service, log_path, figures):
    with log_path.open("w") as file:
        for start in range(0, SCALE.training_log_lines, 100_000):
            file.write("".join(record(step) for step in range(start, start + 100_000)))
    size = log_path.stat().st_size
    unloaded = normal_p50(service, 20)

    stop = threading.Event()
    answers: list[bytes] = []  # parsed once the measurement is over: this process's own work skews it too
    statuses: list[int] = []
    appended = [0]

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while True:
                response = client.get(service.url + "/v1/training")
                statuses.append(response.status_code)
                answers.append(response.content)
                if stop.wait(POLL_EVERY):
                    return

    def grow() -> None:
        # A trainer that logs every step, many times faster than any real one (the same block of steps again
        # and again: cheap to write).
        block = "".join(record(step) for step in range(1000)).encode()
        with log_path.open("ab") as file:
            while not stop.wait(0.05):
                file.write(block)
                file.flush()
                appended[0] += 1000

    with ThreadPoolExecutor(POLLERS + 1) as pool:
        running = [pool.submit(poll) for _ in range(POLLERS)] + [pool.submit(grow)]
        # Measured while the log is being caught up with (it takes the service a minute or more).
        wait_for(lambda: answers, 60, message="the pages to be polling")
        loaded = normal_p50(service, 60 if SCALE.soak else 20)
        health = service.health().status_code
        stop.set()
        for future in running:
            future.result()
    ratio = loaded / unloaded
    figures.update(
        log_mb=round(size / 1e6),
        lines=SCALE.training_log_lines,
        lines_appended=appended[0],
        pollers=POLLERS,
        polls=len(statuses),
        unloaded_p50_ms=round(unloaded * 1000, 1),
        loaded_p50_ms=round(loaded * 1000, 1),
        ratio=round(ratio, 2),
    )
    assert ratio <= 2, figures
    assert set(statuses) == {200} and health == 200
    answers = [json.loads(answer) for answer in answers]
    # Bounded answers, and the log read on, from where each step stopped.
    assert all(len(a["train"]) <= MAX_POINTS + 1 for a in answers)
    records = [a["records"] for a in answers]
    assert records[-1] > records[0] and all(a["skipped"] == 0 for a in answers)
