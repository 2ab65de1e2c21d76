"""HAProxy with the compose file's configuration (deploy/haproxy/haproxy.cfg, rewritten for this machine by
bench.loadgen.haproxy_config, which the benchmark uses too) in front of real services: the same frontend,
backend, checks and exporter, with each replica named by its local port where compose lets Docker's DNS
name them."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import processes
import pytest
from servicekit import Service, free_port, wait_for

from bench.loadgen import haproxy_config


@dataclass
class Balancer:
    url: str
    metrics_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """What HAProxy wrote: its alerts (servers going up and down) and a line per request."""
        return self.log_path.read_text(errors="replace")

    def active_servers(self) -> float:
        """Replicas whose health checks pass."""
        text = httpx.get(self.metrics_url, timeout=10.0).text
        return float(re.search(r'^haproxy_backend_active_servers\{proxy="api"\} (\S+)$', text, re.M).group(1))

    def sessions(self) -> dict[str, float]:
        """Open connections to each replica, by server name."""
        text = httpx.get(self.metrics_url, timeout=10.0).text
        pattern = r'^haproxy_server_current_sessions\{proxy="api",server="(\w+)"\} (\S+)$'
        return {server: float(value) for server, value in re.findall(pattern, text, re.M)}


def start_haproxy(tmp_path: Path, *services: Service) -> Balancer:
    binary = shutil.which("haproxy") or pytest.fail("haproxy not found: apt-get install -y haproxy")
    port, metrics_port = free_port(), free_port()
    config = tmp_path / f"haproxy-{port}.cfg"
    config.write_text(haproxy_config([s.url.removeprefix("http://") for s in services], port, metrics_port))
    log = tmp_path / f"haproxy-{port}.log"
    with open(log, "w") as out:
        process = processes.spawn([binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    balancer = Balancer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log)

    def answers():
        if process.poll() is not None:
            pytest.fail(f"haproxy exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(balancer.metrics_url, timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, 30, interval=0.1, message="haproxy to listen")
    return balancer


# What Traffic's clients send, in turn: seeded, so that any replica serving the same checkpoint answers each
# with the same text.
TRAFFIC_BODIES = [{"prompt": f"Traffic {i}", "max_new_tokens": 4, "temperature": 0.8, "seed": i} for i in range(6)]


class Traffic:
    """Short requests through the balancer from a few clients, each one after another, until stopped:
    every answer (with the body it answers) and every failure."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.done = url, threading.Event()
        self.answers: list[tuple[dict, dict]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]
        for thread in self.threads:
            thread.start()

    def _client(self, client: int) -> None:
        bodies = itertools.cycle(TRAFFIC_BODIES[client % len(TRAFFIC_BODIES) :] + TRAFFIC_BODIES)
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for body in bodies:
                if self.done.is_set():
                    return
                try:
                    response = http.post("/predict", json=body)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                    continue
                if response.status_code == 200:
                    self.answers.append((body, response.json()))
                else:
                    self.failures.append(f"{response.status_code}: {response.text[:200]}")

    def more(self, count: int, message: str) -> None:
        """Wait until `count` more requests have been answered (or one failed)."""
        target = len(self.answers) + count
        wait_for(lambda: len(self.answers) >= target or self.failures, 300, interval=0.2, message=message)

    def stop(self) -> list[tuple[dict, dict]]:
        """Stop the clients; fail on any failed request; return every answer."""
        self.done.set()
        for thread in self.threads:
            thread.join(180)
        assert not self.failures, f"{len(self.failures)} requests failed: {self.failures[:5]}"
        return self.answers

    @property
    def steps(self) -> list[int]:
        """The checkpoint step of each answer, in order."""
        return [answer["model"]["step"] for _, answer in self.answers]
