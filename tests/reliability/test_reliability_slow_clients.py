"""Cheap denial of service does not work: huge prompts, slowloris connections, slow bodies, abandoned uploads.

Each attack runs against a real service while a normal client keeps asking for generations; the normal
client is answered throughout, the attackers are cut off, the service's memory returns to where it was,
and nothing of it is logged or counted as a server error.
"""

from __future__ import annotations

import json
import selectors
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from reliabilitykit import SCALE
from servicekit import publish, wait_for

REQUEST_TIMEOUT = 3.0  # seconds a request may take to arrive, for this file's service


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=2)
    return launch_for_module(checkpoint_dir, "--request-timeout", str(REQUEST_TIMEOUT))


def address(service) -> tuple[str, int]:
    host, port = service.url.removeprefix("http://").split(":")
    return host, int(port)


def normal_latency(service) -> float:
    started = time.monotonic()
    response = httpx.post(service.url + "/predict", json={"prompt": "Hello", "max_new_tokens": 2}, timeout=60)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def api_rss(service) -> int:
    return sum(p["rss"] for p in service.metrics().processes().values() if p["role"] == "api")


def wait_closed_by_server(sockets: list[socket.socket], timeout: float) -> list[bytes]:
    """Read every socket until the service closes it; return what each received."""
    received = {s: b"" for s in sockets}
    with selectors.DefaultSelector() as selector:
        for s in sockets:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1.0):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                received[key.fileobj] += data
                if not data:
                    selector.unregister(key.fileobj)
        assert not selector.get_map(), f"{len(selector.get_map())} connections still open after {timeout:g} s"
    for s in sockets:
        s.close()
    return list(received.values())


def test_huge_prompts_are_refused_cheaply_and_do_not_starve_others(service, figures):
    unloaded = statistics.median(normal_latency(service) for _ in range(5))
    stop = threading.Event()
    answers: list[int] = []

    def flood(i: int) -> None:
        # A mebibyte of digits (refused by its size) or the longest prompt that may fit (tokenized, refused by
        # its token count): the two most expensive prompts to refuse.
        prompt = "7" * (1 << 20 if i % 2 else 128 * 1024)
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                answers.append(client.post(service.url + "/predict", json={"prompt": prompt}).status_code)

    with ThreadPoolExecutor(6) as pool:
        for i in range(6):
            pool.submit(flood, i)
        wait_for(lambda: len(answers) >= 12, 60, message="the flood to be under way")
        loaded = statistics.median(normal_latency(service) for _ in range(10 if SCALE.soak else 5))
        stop.set()
    assert set(answers) <= {413, 422}, set(answers)
    assert "Traceback" not in service.log()
    figures.update(
        unloaded_p50_ms=round(unloaded * 1000, 1),
        loaded_p50_ms=round(loaded * 1000, 1),
        ratio=round(loaded / unloaded, 2),
        huge_prompts_refused=len(answers),
    )


def test_slowloris_and_slow_bodies_are_cut_off_while_others_are_served(service, figures):
    baseline = api_rss(service)
    host_port = address(service)
    slowloris, slow_bodies = [], []
    for _ in range(SCALE.slowloris):
        s = socket.create_connection(host_port)
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-wait: ")  # a header line never finished
        slowloris.append(s)
    body = b'{"prompt": "' + b"y" * ((1 << 20) - 14) + b'"}'  # 1 MiB, the largest body allowed
    for _ in range(SCALE.slow_bodies):
        s = socket.create_connection(host_port)
        head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
        s.sendall(head % len(body))
        s.setblocking(False)
        try:
            s.send(body[: len(body) - 16])  # all but the last bytes, which never come
        except BlockingIOError:
            pass
        slow_bodies.append(s)
    peak = api_rss(service)
    latencies = [normal_latency(service) for _ in range(5)]
    answers = wait_closed_by_server(slowloris + slow_bodies, timeout=REQUEST_TIMEOUT * 10 + 60)
    timed_out = sum(answer.startswith(b"HTTP/1.1 408") for answer in answers)
    busy = sum(answer.startswith(b"HTTP/1.1 503") for answer in answers)
    others = [answer[:60] for answer in answers if answer and not answer.startswith((b"HTTP/1.1 408", b"HTTP/1.1 503"))]
    assert not others, others[:3]
    assert timed_out >= SCALE.slowloris
    # Memory held by the slow bodies is given back once they are gone.
    after = wait_for(lambda: (rss := api_rss(service)) <= baseline + 32 * 2**20 and rss, 30,
                     message="the HTTP server's memory to return to its baseline")  # fmt: skip
    assert service.metrics().get("gpt_http_request_timeouts_total") >= SCALE.slowloris
    figures.update(
        slowloris=SCALE.slowloris,
        slow_bodies=SCALE.slow_bodies,
        answered_408=timed_out,
        answered_503_busy=busy,
        normal_request_max_ms=round(max(latencies) * 1000, 1),
        api_rss_mb={"before": baseline >> 20, "peak": peak >> 20, "after": after >> 20},
    )


def test_a_client_that_hangs_up_mid_upload_is_a_499_not_a_server_error(service, figures):
    def count(status: str) -> float:
        return service.metrics().get("gpt_requests_total", endpoint="/predict", status=status, finish_reason="none")

    before = count("499")
    with socket.create_connection(address(service)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 999\r\n\r\n")
        s.sendall(b'{"prompt": "half of it')
    wait_for(lambda: count("499") == before + 1, 30, message="the abandoned upload to be counted as 499")
    lines = [json.loads(line.split("] ", 1)[1]) for line in service.log().splitlines() if "service.access" in line]
    assert any(entry["status"] == 499 and entry["path"] == "/predict" for entry in lines)
    assert count("500") == 0 and "Traceback" not in service.log()
    figures.update(abandoned_upload_status=499)
