"""`make up`: the docker-compose topology as local processes, for a machine with nothing but Python.

Starts the trainer (built-in corpus, CPU-sized preset, metrics on) and the service over the same
checkpoint folder, plus Prometheus when its binary is installed; prefixes and forwards their
output; says when the API serves its first checkpoint. Ctrl-C (or SIGTERM) stops everything
cleanly: each child gets one SIGINT, time to save or drain, and is killed only if it overstays.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.cli_options import build_settings, settings_options
from service.signals import die_with_parent

ROOT = Path(__file__).resolve().parents[1]


class UpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UP_")

    port: int = Field(8000, ge=1024, le=65535, description="Port of the inference API.")
    trainer_metrics_port: int = Field(9100, ge=1024, le=65535, description="Port of the trainer's Prometheus metrics.")
    prometheus_port: int = Field(9090, ge=1024, le=65535, description="Port of Prometheus, when it is installed.")
    prometheus: bool = Field(True, description="Start Prometheus when the `prometheus` binary is on PATH.")
    checkpoint_dir: Path = Field(Path("checkpoints"), description="Folder the trainer writes and the API serves.")
    run_dir: Path = Field(Path(".run"), description="Folder for Prometheus' configuration and data.")
    data: str = Field("builtin:pydoc", description="Training text (see `trainer fit --help`).")
    preset: str = Field("mini", description="Model shape to train.")
    steps: int = Field(5000, ge=1, description="Training steps.")
    eval_interval: int = Field(50, ge=1, description="Steps between evaluations, so a better checkpoint lands often.")
    grace: float = Field(90.0, gt=0, description="Seconds each process gets to stop after Ctrl-C before it is killed.")


class Child:
    """A supervised program: its output prefixed and forwarded, started again when it dies unexpectedly."""

    # Restarts allowed within RESTART_WINDOW seconds before up gives up (a child that cannot start at all).
    MAX_RESTARTS = 5
    RESTART_WINDOW = 60.0

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.restarts: list[float] = []
        self.finished = False
        self._start()

    def _start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            preexec_fn=functools.partial(own_session_ending_with, os.getpid()),
        )  # fmt: skip
        self._pump = threading.Thread(target=self._forward, args=(self.process,), daemon=True)
        self._pump.start()

    def _forward(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            print(f"[{self.name}] {line.rstrip()}", flush=True)

    def check(self) -> bool:
        """Restart the program if it died (a trainer that finished stays down); False when it keeps dying."""
        code = self.process.poll()
        if code is None or self.finished:
            return True
        if code == 0 and self.name == "trainer":
            print("[up] the trainer finished; the API keeps serving its best checkpoint", flush=True)
            self.finished = True
            return True
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.RESTART_WINDOW] + [now]
        if len(self.restarts) > self.MAX_RESTARTS:
            print(f"[up] {self.name} exited with status {code} {self.MAX_RESTARTS} times within "
                  f"{self.RESTART_WINDOW:.0f} s; giving up", flush=True)  # fmt: skip
            return False
        print(f"[up] {self.name} exited with status {code}; starting it again", flush=True)
        self._pump.join(timeout=5)
        self._start()
        return True

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self, deadline: float) -> int:
        try:
            return self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"[up] {self.name} did not stop in time; killing it", flush=True)
            self.process.kill()
            return self.process.wait()
        finally:
            self._pump.join(timeout=5)


def own_session_ending_with(parent_pid: int) -> None:
    """A child's `preexec_fn`: a session of its own, so that Ctrl-C reaches it only through this supervisor,
    and a graceful SIGTERM if the supervisor is killed outright."""
    os.setsid()
    die_with_parent(parent_pid, signal.SIGTERM)


def prometheus_config(settings: UpSettings) -> Path:
    """deploy/prometheus/prometheus.yml for the one API and the trainer on local ports: no replicas to find
    in Docker's DNS, no load balancer."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    local = {"api": f"127.0.0.1:{settings.port}", "trainer": f"127.0.0.1:{settings.trainer_metrics_port}"}
    config["scrape_configs"] = [
        {"job_name": job["job_name"], "static_configs": [{"targets": [local[job["job_name"]]]}]}
        for job in config["scrape_configs"] if job["job_name"] in local
    ]
    path = settings.run_dir / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start(settings: UpSettings) -> list[Child]:
    python = sys.executable
    children = [
        Child("trainer", [
            python, "-m", "trainer", "fit", "--data", settings.data, "--preset", settings.preset,
            "--steps", str(settings.steps), "--out", str(settings.checkpoint_dir), "--resume",
            "--eval-interval", str(settings.eval_interval), "--checkpoint-interval", str(settings.eval_interval),
            "--metrics-port", str(settings.trainer_metrics_port),
        ]),
        Child("service", [
            python, "-m", "service", "serve", "--checkpoint-dir", str(settings.checkpoint_dir),
            "--host", "127.0.0.1", "--port", str(settings.port),
        ]),
    ]
    binary = shutil.which("prometheus")
    if settings.prometheus and binary:
        children.append(Child("prometheus", [
            binary, f"--config.file={prometheus_config(settings)}",
            f"--storage.tsdb.path={settings.run_dir / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}", "--log.level=warn",
        ]))
    return children


def banner(settings: UpSettings, children: list[Child]) -> None:
    names = {c.name for c in children}
    lines = [
        f"Page         http://127.0.0.1:{settings.port}/  (talk to the model, watch it learn)",
        f"API          http://127.0.0.1:{settings.port}  (readiness: /health, metrics: /metrics)",
        f"Trainer      http://127.0.0.1:{settings.trainer_metrics_port}/metrics, checkpoints in {settings.checkpoint_dir}/",
        f"Prometheus   http://127.0.0.1:{settings.prometheus_port}" if "prometheus" in names
        else "Prometheus   not installed (apt-get install prometheus), skipped",
        "Try:",
        f"  curl -s http://127.0.0.1:{settings.port}/predict -H 'Content-Type: application/json' "
        "-d '{\"prompt\": \"The meaning of life is\", \"max_new_tokens\": 40}'",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(f"[up] {line}" for line in lines), flush=True)


def readiness(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def supervise(settings: UpSettings, children: list[Child], stop: threading.Event) -> int:
    """Report the first served checkpoint and restart what dies; end when asked to or when a child keeps dying."""
    started = time.monotonic()
    served = False
    while not stop.wait(1.0):
        if not all(child.check() for child in children):
            return 1
        if not served and (status := readiness(settings.port)):
            served = True
            print(f"[up] the API is serving after {time.monotonic() - started:.0f} s: {json.dumps(status)}",
                  flush=True)  # fmt: skip
    return 0


@click.command()
@settings_options(UpSettings)
def main(**flags):
    """Run trainer, service and (if installed) Prometheus locally. Options also read UP_* variables."""
    settings = build_settings(UpSettings, flags)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    children = start(settings)
    banner(settings, children)
    status = supervise(settings, children, stop)
    print("[up] stopping: the trainer saves last.pt, the service drains", flush=True)
    for child in children:
        child.interrupt()
    deadline = time.monotonic() + settings.grace
    codes = {child.name: child.stop(deadline) for child in children}
    print(f"[up] stopped ({', '.join(f'{n}: {c}' for n, c in codes.items())})", flush=True)
    sys.exit(status or int(any(codes.values())))


if __name__ == "__main__":
    main()
