"""Helpers of the service tests: tiny checkpoints, the real `service serve` as a subprocess, scrapes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from processes import spawn
from prometheus_client.parser import text_string_to_metric_families

from model import EOT_TOKEN, GPT, GPTConfig, save_checkpoint
from modelkit import sharpen

API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT = 90.0


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.05, message: str = ""):
    """Poll `condition` until it returns something truthy; return it, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {message or condition}")
        time.sleep(interval)


def tiny_model(seed: int = 0, **config) -> GPT:
    """A tiny GPT whose logits are far apart (as a trained model's are) and that never ends a text.

    Scaled weights make greedy and seeded sampling insensitive to the last-bit differences between
    batched and single matrix products; a zero end-of-text embedding puts that token's logit at 0,
    far below the top candidates, so generations always run to max_new_tokens.
    """
    torch.manual_seed(seed)
    model = sharpen(GPT(GPTConfig.from_preset("tiny", **{"block_size": 1024, **config})))
    with torch.no_grad():
        model.transformer.wte.weight[EOT_TOKEN].zero_()
    return model


def publish(directory: Path, step: int, val_loss: float | None = 2.5, seed: int = 0, name="best_model.pt", **config):
    """Publish a checkpoint the way the trainer does (atomically) and return its path."""
    return save_checkpoint(
        Path(directory) / name,
        tiny_model(seed, **config),
        step=step,
        val_loss=val_loss,
        loss=val_loss,
        best_loss=val_loss,
        learning_rate=1e-3,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The per-process metrics every service process exports, by the name Scrape.processes gives them.
PROCESS_FIGURES = {"process_resident_memory_bytes": "rss", "process_threads": "threads", "process_open_fds": "fds"}


class Scrape:
    """One /metrics scrape."""

    def __init__(self, text: str):
        self.text = text
        self.samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def get(self, name: str, **labels) -> float:
        """One sample's value (0 when absent, as for a counter never incremented)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def processes(self) -> dict[int, dict]:
        """Every service process by pid: its role, resident memory, threads and open files."""
        stats: dict[int, dict] = {}
        for (name, labels), value in self.samples.items():
            if name in PROCESS_FIGURES:
                labels = dict(labels)
                stats.setdefault(int(labels["pid"]), {"role": labels["role"]})[PROCESS_FIGURES[name]] = int(value)
        return stats

    def pids(self, role: str) -> list[int]:
        """The pids of the service processes in `role` (main, api, worker, helper)."""
        return [pid for pid, process in self.processes().items() if process["role"] == role]


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    checkpoint_dir: Path
    log_path: Path
    api_key: str | None
    headers: dict = field(default_factory=dict)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60.0)

    def predict(self, **body) -> dict:
        with self.client() as client:
            response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, first: threading.Event | None = None, **body) -> list[tuple[float, dict]]:
        """POST a streamed /predict; return (arrival time, event) pairs, `[DONE]` excluded and checked.

        `first` is set when the first event arrives, for tests that act while the request runs.
        """
        events = []
        with self.client() as client, client.stream("POST", "/predict", json={**body, "stream": True}) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line[len("data: ") :]))
                    if first is not None:
                        first.set()
        assert events and events[-1][1] == "[DONE]", events[-3:]
        return [(t, json.loads(data)) for t, data in events[:-1]]

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=10.0)

    def wait_serving(self, step: int, timeout: float = 30.0) -> float:
        """Wait until every worker serves checkpoint `step`; return when that was seen."""

        def serving():
            response = self.health()
            workers = response.json()["workers"]
            return response.status_code == 200 and all(w["step"] == step for w in workers) and time.monotonic()

        return wait_for(serving, timeout, message=f"the service to serve step {step}")

    def metrics(self) -> Scrape:
        return Scrape(httpx.get(f"{self.url}/metrics", timeout=10.0).text)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_service(
    tmp_path: Path, checkpoint_dir: Path, *args: str, env: dict | None = None, api_key: str | None = None,
    preexec_fn=None,
) -> Service:
    port = free_port()
    log_path = tmp_path / f"service-{port}.log"
    # No grace before the drain (--accept-grace): no load balancer has to take these services out, and
    # every stop would wait for it; the balancer's tests give theirs the default.
    environment = {**os.environ, "SERVICE_POLL_INTERVAL": "0.2", "SERVICE_ACCEPT_GRACE": "0", **(env or {})}
    if api_key:
        environment["SERVICE_API_KEY"] = api_key
    command = [
        sys.executable,
        "-m",
        "service",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--device",
        "cpu",
        "--metrics-dir",
        str(tmp_path / f"metrics-{port}"),
        *args,
    ]
    with open(log_path, "w") as log:
        # A session of its own, as under a terminal or a supervisor: Ctrl-C can be sent to its whole group.
        process = spawn(command, preexec_fn, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment)
    service = Service(
        f"http://127.0.0.1:{port}",
        process,
        checkpoint_dir,
        log_path,
        api_key,
        headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
    )

    def live():
        if process.poll() is not None:
            pytest.fail(f"service exited with {process.returncode}:\n{service.log()}")
        try:
            return httpx.get(f"{service.url}/live", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(live, STARTUP_TIMEOUT, interval=0.1, message="the service to come up")
    return service
