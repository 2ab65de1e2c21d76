"""`make up` end to end: start, first checkpoint served (and how soon), a completion returned, a killed service
started again, Ctrl-C leaves no process."""

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import processes
import psutil
from servicekit import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes whose command line contains `marker` (a path unique to this test)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_make_up_serves_the_trainers_first_checkpoint_restarts_what_dies_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    ports = {"UP_TRAINER_METRICS_PORT": free_port(), "UP_PROMETHEUS_PORT": free_port()}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "UP_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "UP_RUN_DIR": str(tmp_path / "run"),
        # Settings up.py does not pass as flags reach the trainer through its own variables.
        "TRAINER_SEQ_LEN": "32",
        "TRAINER_BATCH_SIZE": "4",
        "TRAINER_EVAL_ITERS": "2",
        "TRAINER_DEVICE": "cpu",
    }
    # Flags through ARGS, the rest through UP_* variables: both ways the README shows.
    make = processes.spawn(
        ["make", "--no-print-directory", "up", f"ARGS=--port {port} --preset tiny --eval-interval 5"], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(make.stdout), daemon=True)
    reader.start()

    def said(text: str) -> bool:
        return any(text in line for line in lines) or make.poll() is not None

    try:
        wait_for(lambda: said("the API is serving"), timeout=300, interval=0.2, message="make up to serve a checkpoint")
        assert make.poll() is None, "".join(lines)
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}" in output and "curl -s" in output
        assert f"Prometheus   http://127.0.0.1:{ports['UP_PROMETHEUS_PORT']}" in output
        seconds = int(re.search(r"the API is serving after (\d+) s", output).group(1))
        print(f"make up served its first checkpoint after {seconds} s")

        response = httpx.post(f"http://127.0.0.1:{port}/predict", json={"prompt": "Hello", "max_new_tokens": 5},
                              timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["model"]["step"] >= 1
        prometheus = f"http://127.0.0.1:{ports['UP_PROMETHEUS_PORT']}/-/ready"
        wait_for(lambda: httpx.get(prometheus, timeout=5).status_code == 200, timeout=30, message="Prometheus")

        # The service's main process killed outright (an OOM kill, say): up starts it again.
        [service] = [p for p in processes_mentioning(str(tmp_path))
                     if "service" in p.cmdline()[1:3] and "deploy/up.py" in " ".join(p.parent().cmdline())]  # fmt: skip
        service.kill()
        wait_for(lambda: said("service exited with status -9; starting it again"), timeout=30,
                 message="up to notice the dead service")  # fmt: skip

        def serves_again() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(serves_again, timeout=120, interval=0.5, message="the restarted service to serve")
    finally:
        # What Ctrl-C does in a terminal: SIGINT to the foreground process group.
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=180)
        reader.join(timeout=10)
    output = "".join(lines)
    assert "[up] stopped (trainer: 0, service: 0, prometheus: 0)" in output, output[-3000:]
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert processes_mentioning(str(tmp_path)) == []
