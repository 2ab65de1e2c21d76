"""Nothing dies silently: every kind of service process killed, a stopped worker, a full metrics disk, a
drain that runs out of time.

Each fault is inflicted on a real service; every client gets an answer (or a closed connection) rather
than waiting forever, and the service either recovers by itself or exits non-zero for its supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import httpx
import processes
import psutil
import pytest
from reliabilitykit import SCALE, wait_idle
from servicekit import free_port, publish, wait_for

LONG = 1000  # tokens: a request that is surely still running when the fault strikes


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=7)
    return launch_for_module(checkpoint_dir, "--api-servers", "2", "--stall-timeout", "2")


def pids(service, role: str) -> list[int]:
    return sorted(service.metrics().pids(role))


def serving(service) -> bool:
    try:
        response = httpx.post(service.url + "/predict", json={"prompt": "Back?", "max_new_tokens": 2}, timeout=5)
    except httpx.TransportError:
        return False
    return response.status_code == 200


def open_stream(service, body: dict):
    """A streamed /predict whose first event has arrived, as (response, its line iterator)."""
    client = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0))
    response = client.send(client.build_request("POST", service.url + "/predict", json={**body, "stream": True}),
                           stream=True)  # fmt: skip
    assert response.status_code == 200
    lines = (line for line in response.iter_lines() if line.startswith("data: "))
    next(lines)
    return client, response, lines


def test_a_killed_http_server_is_replaced_and_its_clients_are_not_left_waiting(service, figures):
    restarts = []
    for _ in range(SCALE.worker_kills):
        # A fresh service's second HTTP server may not have registered yet: killing only one would leave two
        # "new" pids and one restart.
        before = wait_for(lambda: len(api := pids(service, "api")) == 2 and api, 10, message="both HTTP servers")
        restarted = service.metrics().get("gpt_process_restarts_total", role="api")
        client, response, lines = open_stream(service, {"prompt": "Cut off", "max_new_tokens": LONG})
        # Which HTTP server holds this stream is the kernel's choice: kill both, one after the other.
        for victim in before:
            os.kill(victim, signal.SIGKILL)
        with pytest.raises(httpx.TransportError):
            for _ in lines:  # the connection dies with its server: an error, not a wait
                pass
        client.close()
        wait_for(lambda: serving(service), 10, interval=0.1, message="requests to succeed again within 10 s")
        wait_for(lambda: len(set(pids(service, "api")) - set(before)) == 2, 10, message="two new HTTP servers")
        assert service.metrics().get("gpt_process_restarts_total", role="api") == restarted + 2
        # The killed servers' generation was cancelled, not left running for nobody.
        wait_idle(service)
        restarts.append(2)
    assert "HTTP server 0 (pid" in service.log() and "died with status -9; starting another" in service.log()
    figures.update(http_servers_killed=sum(restarts))


def test_a_stopped_worker_fails_its_requests_and_is_reported_until_it_moves_again(service, figures):
    client, response, lines = open_stream(service, {"prompt": "Frozen", "max_new_tokens": LONG})
    [worker] = pids(service, "worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
        assert events[-1]["error"]["code"] == "worker_stalled", events[-1]
        health = service.health()
        assert health.status_code == 503 and health.json()["status"] == "stalled"
        assert health.json()["workers"][0]["status"] == "stalled"
    finally:
        os.kill(worker, signal.SIGCONT)
        client.close()
    wait_for(lambda: service.health().status_code == 200, 30, message="readiness once the worker moves again")
    assert service.predict(prompt="Thawed", max_new_tokens=3)["usage"]["completion_tokens"] == 3
    figures.update(stalled_request_error=events[-1]["error"]["code"])


def test_an_idle_stopped_worker_is_not_ready_and_requests_get_503_at_once(service, figures):
    """A worker that holds no request is stalled on nothing: its heartbeat says it is stopped."""
    wait_idle(service)
    [worker] = pids(service, "worker")
    os.kill(worker, signal.SIGSTOP)
    try:
        health = wait_for(lambda: (h := service.health()).status_code == 503 and h, 30,
                          message="readiness to drop while the worker is stopped")  # fmt: skip
        body = health.json()
        assert body["status"] == "unresponsive" and body["workers"][0]["status"] == "unresponsive"
        assert "inference worker 0 has not answered a heartbeat since" in body["message"]
        scrape = service.metrics()
        assert scrape.get("gpt_worker_responsive", worker="0") == 0
        assert scrape.get("gpt_worker_heartbeat_timestamp_seconds", worker="0") == body["workers"][0]["unresponsive_since"]
        # Refused on arrival, saying why, rather than after the pickup timeout.
        response = httpx.post(service.url + "/predict", json={"prompt": "Anyone?", "max_new_tokens": 2}, timeout=60)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert error["code"] == "worker_unavailable", error
        assert error["message"].startswith("no inference worker can take the request: inference worker 0 has not")
    finally:
        os.kill(worker, signal.SIGCONT)
    wait_for(lambda: service.health().status_code == 200, 30, message="readiness once the worker runs again")
    assert service.metrics().get("gpt_worker_responsive", worker="0") == 1
    assert service.predict(prompt="Thawed", max_new_tokens=3)["usage"]["completion_tokens"] == 3
    figures.update(idle_stopped_worker_health=body["status"], request_while_stopped=response.status_code)


def test_killed_helpers_leave_no_client_waiting(service, figures):
    """multiprocessing's resource tracker only cleans up after the others: the service goes on without it. The
    Manager holds LitServe's queues and cannot be replaced: the service exits non-zero at once, so that its
    supervisor (make up, compose, Kubernetes) restarts it. (Dead workers: test_reliability_workers.py; a dead
    main process takes every other with it: tests/service/test_service_lifecycle.py, and make up restarts it:
    tests/deploy/test_deploy_up.py.)"""
    main = psutil.Process(service.process.pid)
    helpers = [p for p in main.children() if p.pid in pids(service, "helper")]
    [tracker] = [p for p in helpers if "resource_tracker" in " ".join(p.cmdline())]
    [manager] = [p for p in helpers if p.cmdline() == main.cmdline()]
    tracker.kill()
    wait_for(lambda: serving(service), 10, interval=0.1, message="requests to succeed without the resource tracker")
    client, response, lines = open_stream(service, {"prompt": "Orphaned", "max_new_tokens": LONG})
    manager.kill()
    with pytest.raises(httpx.TransportError):
        for _ in lines:
            pass
    client.close()
    assert service.process.wait(timeout=30) == 75
    assert "queue manager died: exiting so that a supervisor restarts the service" in service.log()
    figures.update(manager_killed_exit_status=75)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem of its own (tmpfs), filled up on demand."""
    mount = tmp_path / "metrics"
    mount.mkdir()
    processes.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    yield mount
    processes.run(["umount", "-l", str(mount)], check=True)


def fill(directory) -> None:
    # Unbuffered: bytes left in a buffer when the disk is full would fail again when the file is closed.
    with open(directory / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass


def test_a_full_metrics_disk_costs_metrics_not_service(launch, tmp_path, small_disk, figures):
    publish(tmp_path, step=3)
    service = launch(tmp_path, "--metrics-dir", str(small_disk))
    assert service.predict(prompt="Before", max_new_tokens=3)["usage"]["completion_tokens"] == 3
    fill(small_disk)
    # New processes open new files on the full disk: a worker replaced, an HTTP server replaced.
    [worker] = pids(service, "worker")
    [api] = pids(service, "api")
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: service.health().status_code == 200 and pids(service, "worker") not in ([], [worker]), 60,
             message="a replacement worker on the full disk")  # fmt: skip
    fill(small_disk)  # the replacement freed its predecessor's live gauges
    os.kill(api, signal.SIGKILL)
    wait_for(lambda: serving(service), 30, message="requests to succeed again")
    # Answered in full by processes that could not write a metrics file.
    assert service.predict(prompt="After", max_new_tokens=20)["usage"]["completion_tokens"] == 20
    assert service.stream(prompt="After", max_new_tokens=20)[-1][1]["usage"]["completion_tokens"] == 20
    scrape = service.metrics()
    assert scrape.get("gpt_metrics_storage_failures_total") >= 2
    assert service.log().count("cannot write metrics files") >= 2
    assert "Bus error" not in service.log() and service.process.poll() is None
    figures.update(processes_without_metrics_files=int(scrape.get("gpt_metrics_storage_failures_total")))


def test_one_service_per_metrics_folder_and_a_dead_ones_folder_is_cleaned_and_reused(launch, tmp_path, figures):
    publish(tmp_path, step=3)
    folder = tmp_path / "shared-metrics"
    first = launch(tmp_path, "--metrics-dir", str(folder))
    first.predict(prompt="First", max_new_tokens=8)
    tokens = first.metrics().get("gpt_generation_tokens_total")
    second = processes.run(
        [sys.executable, "-m", "service", "serve", "--checkpoint-dir", str(tmp_path), "--metrics-dir", str(folder),
         "--port", str(free_port()), "--device", "cpu"],
        timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert second.returncode != 0
    assert f"--metrics-dir {folder} is in use by another service (PID {first.process.pid})" in second.stderr
    # The first's files were left alone: its figures did not drop.
    assert first.metrics().get("gpt_generation_tokens_total") == tokens == 8
    # Its main process killed, it holds nothing (the processes it forked hold no copy of the lock): the next
    # service takes the folder, without the dead one's figures.
    first.process.kill()
    first.process.wait()
    third = launch(tmp_path, "--metrics-dir", str(folder))
    third.predict(prompt="Third", max_new_tokens=3)
    assert third.metrics().get("gpt_generation_tokens_total") == 3
    figures.update(second_service="refused, naming the folder and the holder's PID", after_a_kill="reused")


def test_sigterm_that_runs_out_of_drain_time_ends_each_stream_with_an_error_and_exits_1(launch, tmp_path, figures):
    publish(tmp_path, step=2)
    service = launch(tmp_path, "--drain-timeout", "1")
    client, response, lines = open_stream(service, {"prompt": "Never finished", "max_new_tokens": LONG})
    [worker] = pids(service, "worker")
    os.kill(worker, signal.SIGSTOP)  # the stream can no longer finish within the drain
    service.process.send_signal(signal.SIGTERM)
    rest = list(lines)
    client.close()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "draining for 1 s" in error["message"]
    assert service.process.wait(timeout=60) == 1
    assert "drain timeout: 1 running request(s) still unfinished after 1 s" in service.log()
    figures.update(cut_streams=1, exit_status=1)

