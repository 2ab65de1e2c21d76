"""Pretrained weights before the first checkpoint, a worker that dies, idling, and shutting down.

A service is started over an empty checkpoint folder with `--init` pointing at a Hugging Face
directory; the last test of the file stops it with Ctrl-C. SIGTERM gets a service of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import processes
import psutil
import pytest
from servicekit import publish, tiny_model, wait_for

from service.status import alive


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    tiny_model(seed=5).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory, hf_dir):
    # Started with SIGINT ignored, as a script's background job is (`service serve &`): the Ctrl-C test
    # below must drain it all the same, as it drains its HTTP servers (uvicorn handles SIGINT itself).
    ignore_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)
    return launch_for_module(tmp_path_factory.mktemp("checkpoints"), "--init", str(hf_dir), preexec_fn=ignore_sigint)


def worker_pid(service) -> int:
    [pid] = service.metrics().pids("worker")
    return pid


def test_init_weights_are_served_until_a_checkpoint_appears(service, hf_dir):
    assert service.health().status_code == 200
    body = service.predict(prompt="Hello", max_new_tokens=4)
    assert body["model"] == {"step": None, "val_loss": None, "checkpoint": hf_dir.name}


def test_an_idle_service_uses_almost_no_cpu(service):
    service_processes = processes.tree(service.process.pid)
    window = 3.0
    before = processes.cpu_seconds(service_processes)
    time.sleep(window)  # a measurement window, not a synchronisation
    used = processes.cpu_seconds(service_processes) - before
    assert used < 0.05 * window, f"{used:.2f} s of CPU in {window} s idle"


def test_a_killed_worker_fails_its_requests_with_503_and_is_replaced(service):
    victim = worker_pid(service)
    with ThreadPoolExecutor(2) as pool:
        with (
            service.client() as client,
            client.stream(
                "POST", "/predict", json={"prompt": "Doomed", "max_new_tokens": 1000, "stream": True}
            ) as streamed,
        ):
            assert streamed.status_code == 200
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")
            plain = pool.submit(
                lambda: httpx.post(
                    service.url + "/predict", json={"prompt": "Doomed too", "max_new_tokens": 1000}, timeout=60
                )
            )
            wait_for(lambda: service.metrics().get("gpt_num_requests_running") == 2, 10, message="both requests")
            os.kill(victim, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        response = plain.result()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "worker_unavailable"
    assert rest[-1] == "data: [DONE]"
    assert '"worker_unavailable"' in rest[-2] and "died" in rest[-2]

    wait_for(lambda: service.health().status_code == 200, 60, interval=0.2, message="a replacement worker")
    assert worker_pid(service) != victim
    assert service.predict(prompt="Back", max_new_tokens=3)["usage"]["completion_tokens"] == 3
    # The dead worker's gauges went with it.
    assert service.metrics().get("gpt_num_requests_running") == 0


def test_ctrl_c_drains_and_leaves_no_process(service):
    publish(service.checkpoint_dir, step=7)
    service.wait_serving(step=7)
    assert_drains(service, lambda: os.killpg(service.process.pid, signal.SIGINT))


def test_sigterm_drains_and_leaves_no_process_whichever_thread_takes_it(launch, tmp_path):
    """The kernel hands a process's signal to any thread that does not block it, and Python handles it
    in the main thread only: here the SIGTERM goes to one of the main process's other threads, as it
    did under load when a Ctrl-C went unhandled and the service neither drained nor exited."""
    publish(tmp_path, step=3)
    service = launch(tmp_path, "--api-servers", "2", "--workers", "2")
    service.wait_serving(step=3)
    scrape = service.metrics()
    assert len(scrape.pids("api")) == 2 and len(scrape.pids("worker")) == 2
    others = [thread.id for thread in psutil.Process(service.process.pid).threads() if thread.id != service.process.pid]
    assert others, "the main process runs threads beside its main one"
    assert_drains(service, lambda: signal_thread(service.process.pid, others[-1], signal.SIGTERM))


def test_sigterms_repeated_at_the_http_servers_through_the_drain_leave_a_clean_exit(launch, tmp_path):
    """LitServe's shutdown terminates each HTTP server again after the service's own SIGTERM; one that
    landed after a server's drain, as it did under load, ended the server "killed by SIGTERM" and the
    service with status 1. Here SIGTERMs go to the servers without pause until they are gone."""
    publish(tmp_path, step=3)
    service = launch(tmp_path, "--api-servers", "2")
    service.wait_serving(step=3)
    # psutil checks each process is still the one it was (pid and start time) before signalling it.
    servers = [psutil.Process(pid) for pid in service.metrics().pids("api")]
    assert len(servers) == 2

    def hammer() -> None:
        while any(server.is_running() for server in servers):
            for server in servers:
                with contextlib.suppress(psutil.NoSuchProcess):
                    server.send_signal(signal.SIGTERM)

    hammering = threading.Thread(target=hammer, daemon=True)
    assert_drains(service, lambda: (os.kill(service.process.pid, signal.SIGTERM), hammering.start()))
    hammering.join(timeout=60)


def signal_thread(pid: int, thread_id: int, sig: int) -> None:
    """tgkill(2): `sig` to one thread of process `pid`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(TGKILL[platform.machine()], pid, thread_id, sig) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


TGKILL = {"x86_64": 234, "aarch64": 131}  # the system call's number


def test_no_process_outlives_a_killed_main_process(launch, tmp_path):
    publish(tmp_path, step=4)
    service = launch(tmp_path)
    pids = [p.pid for p in processes.tree(service.process.pid)]
    service.process.kill()
    service.process.wait(timeout=10)
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, message="every service process to exit")


def assert_drains(service, stop):
    """Stop the service mid-request: the request completes, new ones are not served, nothing remains."""
    pids = [p.pid for p in processes.tree(service.process.pid)]
    assert len(pids) >= 4  # main, HTTP server(s), inference worker, LitServe's manager
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(service.stream, prompt="Finish me", max_new_tokens=600)
        wait_for(lambda: service.metrics().get("gpt_num_requests_running") == 1, 10, message="the request")
        stop()
        wait_for(lambda: refused(service), 10, message="new requests to be refused")
        events = running.result()
    assert events[-1][1]["finish_reason"] == "length"
    assert events[-1][1]["usage"]["completion_tokens"] == 600
    assert service.process.wait(timeout=60) == 0
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, message="every service process to exit")


def refused(service) -> bool:
    try:
        httpx.get(service.url + "/health", timeout=0.5)
    except httpx.TransportError:
        return True
    return False
