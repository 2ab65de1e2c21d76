"""HAProxy with the compose file's configuration (deploy/haproxy/haproxy.cfg, rewritten for this machine by
bench.loadgen.haproxy_config, which the benchmark uses too) in front of real services: the same frontend,
backend, checks and exporter, with each replica named by its local port where compose lets Docker's DNS
name them."""

from __future__ import annotations

import re
import shutil
import subprocess
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
    balancer = Balancer(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process)

    def answers():
        if process.poll() is not None:
            pytest.fail(f"haproxy exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(balancer.metrics_url, timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, 30, interval=0.1, message="haproxy to listen")
    return balancer
