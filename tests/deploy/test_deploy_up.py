"""`make up` end to end: start, first checkpoint served, a completion returned, Ctrl-C leaves no process."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import processes
from servicekit import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def processes_mentioning(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (a path unique to this test)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_make_up_serves_the_trainers_first_checkpoint_and_stops_cleanly_on_ctrl_c(tmp_path):
    ports = {"UP_PORT": free_port(), "UP_TRAINER_METRICS_PORT": free_port(), "UP_PROMETHEUS_PORT": free_port()}
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        "UP_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "UP_RUN_DIR": str(tmp_path / "run"),
        "UP_PRESET": "tiny",
        "UP_EVAL_INTERVAL": "5",
        # Settings up.py does not pass as flags reach the trainer through its own variables.
        "TRAINER_SEQ_LEN": "32",
        "TRAINER_BATCH_SIZE": "4",
        "TRAINER_EVAL_ITERS": "2",
        "TRAINER_DEVICE": "cpu",
    }
    make = processes.spawn(
        ["make", "--no-print-directory", "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(make.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("the API is serving" in line for line in lines) or make.poll() is not None,
                 timeout=180, interval=0.2, message="make up to serve a checkpoint")
        assert make.poll() is None, "".join(lines)
        output = "".join(lines)
        assert f"http://127.0.0.1:{ports['UP_PORT']}" in output and "curl -s" in output
        assert f"Prometheus   http://127.0.0.1:{ports['UP_PROMETHEUS_PORT']}" in output

        response = httpx.post(f"http://127.0.0.1:{ports['UP_PORT']}/predict",
                              json={"prompt": "Hello", "max_new_tokens": 5}, timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] >= 1 and body["model"]["step"] >= 5
        prometheus = f"http://127.0.0.1:{ports['UP_PROMETHEUS_PORT']}/-/ready"
        wait_for(lambda: httpx.get(prometheus, timeout=5).status_code == 200, timeout=30, message="Prometheus")
        assert processes_mentioning(str(tmp_path))
    finally:
        # What Ctrl-C does in a terminal: SIGINT to the foreground process group.
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=180)
        reader.join(timeout=10)
    output = "".join(lines)
    assert "[up] stopped (trainer: 0, service: 0, prometheus: 0)" in output, output[-3000:]
    assert (tmp_path / "checkpoints" / "last.pt").exists()
    assert processes_mentioning(str(tmp_path)) == []
