"""`docker compose up` proven end to end: the image built from deploy/Dockerfile, and the stack of
docker-compose.yml (api, trainer, prometheus; Grafana cannot be had offline) run on a private engine.

`make test-compose` runs this file; its name keeps it out of `make test`. The checks run in order on one
stack, as a user meets it: build, up, train and serve, watch, stop, resume, a one-off run, down; the
whole sequence once with Debian's docker-compose 1.29 and once with Compose v2 (`docker compose`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from composekit import (
    COMPOSE_COMMANDS,
    Compose,
    TorchIndex,
    build_standins,
    compose_v2_config,
    output_tail,
    private_engine,
    require_tools,
)
from servicekit import free_port, wait_for

from model.checkpoint import read_checkpoint

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "gpt-service.json"
USER_ID = "10001"  # the Dockerfile's `app` user
STREAM_SECONDS = 10  # a stream stopped in the middle runs about this long, well inside the 30 s drain

# Test-size settings, through the same environment variables a user would set.
TRAINER_ENV = {
    "TRAINER_STEPS": "1000000",  # runs until stopped
    "TRAINER_PRESET": "tiny",
    "TRAINER_BLOCK_SIZE": "4096",  # room for a stream long enough to be stopped in the middle
    "TRAINER_BATCH_SIZE": "4",
    "TRAINER_SEQ_LEN": "32",
    "TRAINER_EVAL_INTERVAL": "50",
    "TRAINER_EVAL_ITERS": "2",
    "TRAINER_CHECKPOINT_INTERVAL": "50",
    "TRAINER_LOG_INTERVAL": "50",
    "TRAINER_DEVICE": "cpu",
    "TRAINER_DTYPE": "fp32",
    "TRAINER_COMPILE": "false",
    "OMP_NUM_THREADS": "1",  # a core left for the API on a two-core machine
}
API_ENV = {"SERVICE_POLL_INTERVAL": "0.5", "SERVICE_MAX_NEW_TOKENS": "4000"}


class Stack:
    def __init__(self, compose: Compose, api: str, prometheus: str):
        self.compose, self.api, self.prometheus = compose, api, prometheus

    def diagnosis(self) -> str:
        """What a failure message needs: each container's state and mounts, and the last log lines."""
        lines = []
        for service in ("api", "trainer", "prometheus"):
            ids = self.compose.run("ps", "-a", "-q", service).stdout.split()
            for info in self.compose.engine.inspect("container", *ids) if ids else []:
                mounts = ", ".join(f"{m.get('Name') or m['Source']} -> {m['Destination']}" for m in info["Mounts"])
                state = info["State"]
                lines.append(f"{service}: {state['Status']} (exit {state['ExitCode']}); mounts: {mounts}")
        return "\n".join(lines) + "\n" + self.compose.logs("api", "trainer", "prometheus")

    def health(self) -> httpx.Response | None:
        try:
            return httpx.get(f"{self.api}/health", timeout=10)
        except httpx.TransportError:
            return None

    def wait_health(self, condition, timeout: float, message: str) -> dict:
        def check():
            response = self.health()
            return response is not None and condition(response) and response.json()

        try:
            return wait_for(check, timeout, interval=0.5, message=message)
        except pytest.fail.Exception as e:
            response = self.health()
            pytest.fail(f"{e}; last /health: {response and response.text}\n{self.diagnosis()}")

    def serving(self, timeout: float = 300) -> dict:
        """Wait until the API serves a model; return /health's worker entry."""
        body = self.wait_health(lambda r: r.status_code == 200, timeout, "the API to serve a checkpoint")
        return body["workers"][0]

    def predict(self, **body) -> dict:
        response = httpx.post(f"{self.api}/predict", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def stream(self, events: list, first: threading.Event, **body) -> None:
        """POST a streamed /predict; its events go to `events`, the request id first."""
        with httpx.stream("POST", f"{self.api}/predict", json={**body, "stream": True}, timeout=120) as response:
            assert response.status_code == 200, response.read()
            events.append(response.headers["x-request-id"])
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    first.set()

    def query(self, expr: str) -> list:
        response = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()["data"]["result"]

    def exec(self, service: str, *argv: str) -> str:
        return self.compose.engine.docker("exec", self.compose.container(service)["Id"], *argv).stdout


def interrupt(signum, frame):
    raise KeyboardInterrupt


@pytest.fixture(scope="module", params=list(COMPOSE_COMMANDS))
def stack(request, tmp_path_factory):
    """The whole sequence runs once per Compose implementation (pytest groups a module's tests by this
    fixture's parameter, in their order), each on an engine of its own."""
    require_tools()
    command = COMPOSE_COMMANDS[request.param]
    docker_config = {"DOCKER_CONFIG": str(compose_v2_config())} if request.param == "v2" else {}
    # A SIGTERM to pytest (a CI timeout) unwinds like Ctrl-C, so the engine is stopped and its folder removed.
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with private_engine() as engine:
            index = TorchIndex()
            try:
                build_standins(engine)
                api_port, prometheus_port = free_port(), free_port()
                build = {"network": "host", "args": {"TORCH_INDEX": index.url}}  # the engine has no NAT
                override = tmp_path_factory.mktemp("compose") / "docker-compose.test.yml"
                override.write_text(yaml.safe_dump({"services": {
                    "api": {"build": build, "environment": API_ENV},
                    "trainer": {"build": build, "environment": TRAINER_ENV},
                }}))  # fmt: skip
                ports = {"API_PORT": str(api_port), "PROMETHEUS_PORT": str(prometheus_port)}
                env = {**engine.env, **docker_config, **ports}
                compose = Compose(engine, f"gptcompose{os.getpid()}", override, env, command)
                try:
                    yield Stack(compose, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prometheus_port}")
                finally:
                    compose.run("down", "--volumes", "--remove-orphans", "--timeout", "10")
            finally:
                index.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_image_builds_from_the_dockerfile(stack):
    stack.compose.ok("build", timeout=1800)
    image = stack.compose.engine.inspect("image", "gpt-service:latest")[0]
    assert image["Config"]["User"] == "app", image["Config"]


def test_the_api_answers_503_until_a_checkpoint_exists(stack):
    stack.compose.ok("up", "-d", "api")
    body = stack.wait_health(lambda r: r.status_code == 503, 180, "the API to start, waiting for a checkpoint")
    assert body["status"] == "waiting" and "waiting for a checkpoint in /checkpoints" in body["message"], body
    response = httpx.post(f"{stack.api}/predict", json={"prompt": "Hello"}, timeout=30)
    assert response.status_code == 503, response.text
    assert stack.compose.container("api")["State"]["Health"]["Status"] != "healthy"


def test_the_trainer_publishes_into_the_volume_the_api_serves_without_a_restart(stack):
    before = stack.compose.container("api")
    stack.compose.ok("up", "-d", "api", "trainer", "prometheus")
    api, trainer = stack.compose.container("api"), stack.compose.container("trainer")
    volumes = {
        name: {m["Destination"]: (m.get("Name"), m["RW"]) for m in info["Mounts"]}
        for name, info in (("api", api), ("trainer", trainer))
    }
    shared = volumes["trainer"].get("/checkpoints", (None, None))[0]
    assert shared and shared.endswith("_checkpoints"), f"no checkpoints volume at the trainer's /checkpoints: {volumes}"
    assert volumes["api"].get("/checkpoints") == (shared, False), (
        f"the API must mount the trainer's {shared} read-only at /checkpoints: {volumes}"
    )

    first = stack.serving()
    after = stack.compose.container("api")
    assert (after["Id"], after["State"]["StartedAt"], after["RestartCount"]) == (
        before["Id"], before["State"]["StartedAt"], 0
    ), "the API restarted to serve the checkpoint"  # fmt: skip

    answer = stack.predict(prompt="To be, or not to be", max_new_tokens=16, seed=1)
    assert answer["text"] and answer["usage"]["completion_tokens"] <= 16 and answer["model"]["step"] >= first["step"]
    events, started = [], threading.Event()
    stack.stream(events, started, prompt="To be, or not to be", max_new_tokens=16, seed=1)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["finish_reason"] in ("stop", "length"), events[-3:]
    assert "".join(json.loads(e).get("text", "") for e in events[1:-1]), events

    better = stack.wait_health(
        lambda r: r.status_code == 200 and r.json()["workers"][0]["val_loss"] < first["val_loss"],
        180, f"a better checkpoint than step {first['step']} (val loss {first['val_loss']:.4f}) to be served",
    )["workers"][0]  # fmt: skip
    assert better["step"] > first["step"]


def test_both_containers_run_their_program_as_pid_1_as_the_non_root_user_and_turn_healthy(stack):
    for service in ("api", "trainer"):
        wait_for(
            lambda s=service: stack.compose.container(s)["State"]["Health"]["Status"] == "healthy", 180, interval=1.0,
            message=f"{service}'s healthcheck to pass",
        )  # fmt: skip
    for service, program in (("api", "service serve"), ("trainer", "trainer fit")):
        status = dict(line.split(":", 1) for line in stack.exec(service, "cat", "/proc/1/status").splitlines())
        assert status["Uid"].split()[0] == USER_ID, f"{service} runs as uid {status['Uid']}"
        argv = stack.exec(service, "cat", "/proc/1/cmdline").split("\0")
        # SIGTERM from `docker stop` goes to PID 1: it must be the program, not a shell wrapped around it.
        assert program in " ".join(argv) and not argv[0].endswith("sh"), f"{service}'s PID 1 is {argv}"


def dashboard_query(title: str) -> str:
    """A Grafana panel's first query, its rate window as Grafana would set it for a 5 s scrape interval."""
    panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == title)
    return panel["targets"][0]["expr"].replace("$__rate_interval", "1m")


def test_prometheus_scrapes_both_targets_and_answers_the_dashboard(stack):
    def targets():
        response = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10)
        return {t["labels"]["job"]: t for t in response.json()["data"]["activeTargets"]}

    def both_up():
        try:
            found = targets()
        except httpx.TransportError:
            return False
        return set(found) == {"api", "trainer"} and all(t["health"] == "up" for t in found.values())

    try:
        wait_for(both_up, 120, interval=1.0, message="Prometheus to scrape the api and trainer targets")
    except pytest.fail.Exception as e:
        found = {job: (t["scrapeUrl"], t["health"], t["lastError"]) for job, t in targets().items()}
        pytest.fail(f"{e}: {found}")

    for i in range(4):
        stack.predict(prompt=f"Prometheus {i}", max_new_tokens=8)
    for title in ("End-to-end latency", "Output tokens/s", "Training tokens/s"):
        expr = dashboard_query(title)

        def answered(expr=expr):
            values = [float(r["value"][1]) for r in stack.query(expr)]
            return values and all(math.isfinite(v) and v > 0 for v in values)

        wait_for(answered, 90, interval=1.0, message=f"panel {title!r} ({expr}) to return data")


def log_time(line: str) -> str:
    """The timestamp `docker logs --timestamps` puts first, made sortable (it drops trailing zeros)."""
    seconds, _, fraction = line.split()[0].rstrip("Z").partition(".")
    return f"{seconds}.{fraction:0<9}"


def test_stop_drains_a_running_stream_within_the_grace_period(stack):
    # The stream's length from the speed this (shared) machine has now: stopped just after its first
    # event, it must still be running when SIGTERM lands a second or two later, and finish in the drain.
    began = time.monotonic()
    rate = stack.predict(prompt="Warm", max_new_tokens=200, seed=2)["usage"]["completion_tokens"] / (
        time.monotonic() - began
    )
    events, started = [], threading.Event()
    body = {"prompt": "Stop", "max_new_tokens": int(min(max(rate * STREAM_SECONDS, 200), 4000)), "seed": 3}
    client = threading.Thread(target=stack.stream, args=(events, started), kwargs=body)
    client.start()
    assert started.wait(60), "the stream never started"
    began = time.monotonic()
    stack.compose.ok("stop", "api")
    stopped = time.monotonic() - began
    client.join(60)
    assert events[-1] == "[DONE]", f"the stream was cut: {events[-2:]}"
    last = json.loads(events[-2])
    assert "error" not in last and last["finish_reason"] in ("length", "stop"), last
    state = stack.compose.container("api")["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], f"the API exited with {state['ExitCode']}"
    assert stopped < 45, f"`{stack.compose.name} stop api` took {stopped:.0f} s: the grace period ran out"
    # The proof that it drained: the request's access-log line comes after LitServe began its shutdown.
    logs = stack.compose.logs("api", tail=200)
    lines = [line.split("| ", 1)[-1] for line in logs.splitlines()]
    shutdown = next((log_time(line) for line in lines if "graceful shutdown" in line), None)
    finished = next((log_time(line) for line in lines if f'"request_id": "{events[0]}"' in line), None)
    assert shutdown and finished and finished > shutdown, (
        f"the stream was not running when SIGTERM arrived (shutdown at {shutdown}, request done at {finished}):\n"
        f"{output_tail(logs)}"
    )


def test_the_trainer_writes_last_pt_on_sigterm_and_resumes_from_it(stack, tmp_path):
    began = time.monotonic()
    stack.compose.ok("stop", "trainer")
    stopped = time.monotonic() - began
    trainer = stack.compose.container("trainer")
    assert trainer["State"]["ExitCode"] == 0, f"the trainer exited with {trainer['State']['ExitCode']}"
    assert stopped < 120, f"`{stack.compose.name} stop trainer` took {stopped:.0f} s: the grace period ran out"
    assert "SIGTERM received" in stack.compose.logs("trainer", tail=50), stack.compose.logs("trainer")
    stack.compose.engine.docker("cp", f"{trainer['Id']}:/checkpoints/last.pt", str(tmp_path / "last.pt"))
    step = read_checkpoint(tmp_path / "last.pt")["step"]

    stack.compose.ok("up", "-d", "api", "trainer", "prometheus")
    wait_for(
        lambda: f"resuming at step {step}," in stack.compose.logs("trainer", tail="all"), 180, interval=2.0,
        message=f"the trainer to resume from last.pt at step {step}",
    )  # fmt: skip
    stack.serving()


def test_a_one_off_trainer_run_completes_and_its_checkpoint_is_served(stack):
    stack.compose.ok("stop", "trainer")
    output = stack.compose.ok(
        "run", "--rm", "-T", "trainer",
        "trainer", "fit", "--steps", "20", "--eval-interval", "10", "--no-resume", "--seed", "7",
        "--data", "builtin:pydoc", "--out", "/checkpoints",
    )  # fmt: skip
    saved = [line for line in output.splitlines() if line.startswith("Saved best model")]
    assert saved, f"the run saved no best model:\n{output_tail(output)}"
    step = int(saved[-1].rsplit("step ", 1)[1].split(")")[0])
    stack.wait_health(
        lambda r: r.status_code == 200 and r.json()["workers"][0]["step"] == step, 120,
        f"the API to serve the one-off run's checkpoint (step {step})",
    )  # fmt: skip
    label = f"label=com.docker.compose.project={stack.compose.project}"
    oneoff = "label=com.docker.compose.oneoff=True"
    left = stack.compose.engine.docker("ps", "-a", "-q", "--filter", label, "--filter", oneoff)
    assert not left.stdout.split(), "`run --rm` left its container behind"


def test_down_leaves_nothing_of_the_project(stack):
    stack.compose.ok("down", "--volumes")
    assert stack.compose.leftovers() == {}
