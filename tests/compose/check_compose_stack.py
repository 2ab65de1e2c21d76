"""`docker compose up` proven end to end: the image built from deploy/Dockerfile, and the stack of
docker-compose.yml (api replicas behind the lb, trainer, prometheus; Grafana cannot be had offline) run on a
private engine.

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
from lbkit import Traffic
from servicekit import Scrape, free_port, wait_for
from trainerkit import resumed_step

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
# fp32 everywhere: --dtype auto times each precision at load, and replicas could choose differently.
API_ENV = {"SERVICE_POLL_INTERVAL": "0.5", "SERVICE_MAX_NEW_TOKENS": "4000", "SERVICE_DTYPE": "fp32"}
REPLICAS = 3
# The two-node training (profile multinode): 20 steps of the tiny model, a fresh run.
NODES = ("trainer-node0", "trainer-node1")
# Resuming, as the compose file's default: a run whose node is killed continues from last.pt.
NODE_ENV = {**TRAINER_ENV, "TRAINER_STEPS": "20", "TRAINER_BLOCK_SIZE": "64", "TRAINER_EVAL_INTERVAL": "10",
            "TRAINER_CHECKPOINT_INTERVAL": "5", "TRAINER_LOG_INTERVAL": "1", "TRAINER_RESUME": "true"}  # fmt: skip
# The same data as the nodes' command: the host's input.txt when there is one.
ONE_NODE = ('if [ -f /corpus/input.txt ]; then data=/corpus/input.txt; else data=builtin:pydoc; fi; exec torchrun '
            '--standalone --nproc-per-node 2 -m trainer fit --data "$data" --out /checkpoints/one-node')  # fmt: skip
# Run in a container over the nodes' volume: how far two runs' weights and logged losses part.
COMPARE = """
import json, sys
from pathlib import Path
from model import read_checkpoint
runs = [Path(folder) for folder in sys.argv[1:]]
a, b = (read_checkpoint(run / "final_model.pt")["model"] for run in runs)
losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
          for run in runs]
print(json.dumps({
    "same_tensors": sorted(a) == sorted(b),
    "weights": max((a[k] - b[k]).abs().max().item() for k in a),
    "steps": [sorted(l) for l in losses],
    "losses": max(abs(losses[0][s] - losses[1][s]) for s in losses[0]),
}))
"""


class Stack:
    """`api` is the load balancer's address on the host, the API's port; replicas are reached directly
    through the project network's bridge."""

    def __init__(self, compose: Compose, api: str, prometheus: str):
        self.compose, self.api, self.prometheus = compose, api, prometheus

    def diagnosis(self) -> str:
        """What a failure message needs: each container's state and mounts, and the last log lines."""
        lines = []
        for service in ("api", "lb", "trainer", "prometheus"):
            ids = self.compose.run("ps", "-a", "-q", service).stdout.split()
            for info in self.compose.engine.inspect("container", *ids) if ids else []:
                mounts = ", ".join(f"{m.get('Name') or m['Source']} -> {m['Destination']}" for m in info["Mounts"])
                state = info["State"]
                lines.append(f"{service}: {state['Status']} (exit {state['ExitCode']}); mounts: {mounts}")
        return "\n".join(lines) + "\n" + self.compose.logs("api", "lb", "trainer", "prometheus")

    def nodes_finished(self) -> list[dict]:
        """Wait for both trainer nodes to exit, and check that they exited 0; their states."""

        def finished():
            states = [self.compose.container(node)["State"] for node in NODES]
            return all(state["Status"] == "exited" for state in states) and states

        states = wait_for(finished, 600, interval=2.0, message="both trainer nodes to finish their 20 steps")
        assert [state["ExitCode"] for state in states] == [0, 0], self.compose.logs(*NODES)
        return states

    def compare_runs(self, *folders: str) -> dict:
        """COMPARE's figures for two runs' folders on the nodes' volume."""
        argv = ("--profile", "multinode", "run", "--rm", "-T", "--no-deps", NODES[0], "python", "-c", COMPARE)
        return json.loads(self.compose.ok(*argv, *folders).strip().splitlines()[-1])

    def replicas(self) -> list[str]:
        """The address of every running api replica."""
        running = [c for c in self.compose.containers("api") if c["State"]["Running"]]
        return [self.compose.address(c, 8000) for c in running]

    def health(self, replica: str | None = None) -> httpx.Response | None:
        """/health of `replica`, or of the one replica (the balancer would answer for whichever is ready)."""
        if replica is None:
            replica = self.compose.address(self.compose.container("api"), 8000)
        try:
            return httpx.get(f"{replica}/health", timeout=10)
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
        """Wait until the API serves a model and the balancer sends to it (its next check after the replica's
        /health turns 200 takes it in: until then the balancer has no server); return /health's worker entry."""
        body = self.wait_health(lambda r: r.status_code == 200 and self.balanced() >= 1, timeout,
                                "the API to serve a checkpoint through the balancer")  # fmt: skip
        return body["workers"][0]

    def fleet_serving(self, replicas: int, step: int | None = None, timeout: float = 300) -> int:
        """Wait until `replicas` replicas all serve one checkpoint (`step` if given) and the balancer sends
        to every one of them; return the step."""

        def same():
            urls = self.replicas()
            answers = [self.health(url) for url in urls]
            if len(urls) != replicas or any(a is None or a.status_code != 200 for a in answers):
                return False
            steps = {w["step"] for a in answers for w in a.json()["workers"]}
            return len(steps) == 1 and step in (None, *steps) and self.balanced() == replicas and steps.pop()

        try:
            return wait_for(same, timeout, interval=0.5, message=f"{replicas} replicas to serve checkpoint {step}")
        except pytest.fail.Exception as e:
            seen = {url: (r := self.health(url)) is not None and r.text for url in self.replicas()}
            pytest.fail(f"{e}; /health: {seen}\n{self.diagnosis()}")

    def balancer_scrape(self) -> Scrape:
        """HAProxy's own metrics."""
        metrics = self.compose.address(self.compose.container("lb"), 8405)
        return Scrape(httpx.get(f"{metrics}/metrics", timeout=10).text)

    def balanced(self) -> int:
        """Replicas the balancer sends to (their /health checks pass)."""
        try:
            return int(self.balancer_scrape().get("haproxy_backend_active_servers", proxy="api"))
        except httpx.TransportError:
            return 0

    def balancer_sessions(self) -> dict[str, float]:
        """Open sessions per balancer slot that holds a replica's address."""
        return {dict(labels)["server"]: v for (name, labels), v in self.balancer_scrape().samples.items()
                if name == "haproxy_server_current_sessions" and ("proxy", "api") in labels}  # fmt: skip

    def pids(self, container: dict) -> list[int]:
        """Host pids of every process in a container."""
        return [int(pid) for pid in self.compose.engine.docker("top", container["Id"], "-eo", "pid").stdout.split()[1:]]

    def answered(self, replica: str) -> float:
        """/predict requests a replica has answered."""
        scrape = Scrape(httpx.get(f"{replica}/metrics", timeout=10).text)
        return sum(v for (name, labels), v in scrape.samples.items()
                   if name == "gpt_requests_total" and ("endpoint", "/predict") in labels)  # fmt: skip

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
                    **{node: {"build": build, "environment": NODE_ENV} for node in NODES},
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
    stack.compose.ok("up", "-d", "lb")  # and the api it depends on
    body = stack.wait_health(lambda r: r.status_code == 503, 180, "the API to start, waiting for a checkpoint")
    assert body["status"] == "waiting" and "waiting for a checkpoint in /checkpoints" in body["message"], body
    # The balancer sends nothing to a replica whose /health fails: the answer is its own 503.
    response = httpx.post(f"{stack.api}/predict", json={"prompt": "Hello"}, timeout=30)
    assert response.status_code == 503 and "No server is available" in response.text, response.text
    assert stack.compose.container("api")["State"]["Health"]["Status"] != "healthy"


def test_the_trainer_publishes_into_the_volume_the_api_serves_without_a_restart(stack):
    before = stack.compose.container("api")
    stack.compose.ok("up", "-d", "api", "lb", "trainer", "prometheus")
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


def test_prometheus_scrapes_every_target_and_answers_the_dashboard(stack):
    def targets():
        response = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10)
        return {t["labels"]["job"]: t for t in response.json()["data"]["activeTargets"]}

    def every_up():
        try:
            found = targets()
        except httpx.TransportError:
            return False
        return set(found) == {"api", "lb", "trainer"} and all(t["health"] == "up" for t in found.values())

    try:
        wait_for(every_up, 120, interval=1.0, message="Prometheus to scrape the api, lb and trainer targets")
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

    stack.compose.ok("up", "-d", "api", "lb", "trainer", "prometheus")
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


def streamed_text(events: list) -> str:
    return "".join(json.loads(e).get("text", "") for e in events[1:-1])


def test_three_replicas_share_30_concurrent_streams_each_the_text_of_its_solo_run(stack):
    # The trainer is stopped (the one-off run above): one checkpoint, so every replica computes alike.
    # The replicas come from the compose file's deploy.replicas (API_REPLICAS), kept for the checks after
    # this one; the scaling check uses --scale.
    stack.compose.env["API_REPLICAS"] = str(REPLICAS)
    stack.compose.ok("up", "-d", "api", "lb")
    stack.fleet_serving(REPLICAS)
    bodies = [{"prompt": f"Replica {i}", "max_new_tokens": 24, "temperature": 0.8, "seed": i} for i in range(30)]
    solo = [stack.predict(**body)["text"] for body in bodies]
    before = {url: stack.answered(url) for url in stack.replicas()}
    streams = [([], threading.Event()) for _ in bodies]
    clients = [threading.Thread(target=stack.stream, args=stream, kwargs=body) for stream, body in zip(streams, bodies)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(300)
    assert all(events[-1:] == ["[DONE]"] for events, _ in streams), [events[-2:] for events, _ in streams]
    assert [streamed_text(events) for events, _ in streams] == solo
    served = {url: stack.answered(url) - before[url] for url in before}
    assert sum(served.values()) == len(bodies) and all(served.values()), served


def test_prometheus_finds_every_replica_in_dns_and_answers_the_fleet_panels(stack):
    def replicas_up():
        response = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10)
        targets = response.json()["data"]["activeTargets"]
        api = [t["health"] for t in targets if t["labels"]["job"] == "api"]
        lb = [t["health"] for t in targets if t["labels"]["job"] == "lb"]
        return api == ["up"] * REPLICAS and lb == ["up"]

    wait_for(replicas_up, 120, interval=1.0, message=f"Prometheus to scrape {REPLICAS} api replicas and the lb")
    for i in range(2 * REPLICAS):
        stack.predict(prompt=f"Fleet {i}", max_new_tokens=8)
    expected = {
        "API replicas": lambda values: values == [REPLICAS, REPLICAS],
        "Output tokens/s by replica": lambda values: len(values) == REPLICAS,
        "Served checkpoint step by replica": lambda values: len(values) == REPLICAS and len(set(values)) == 1,
        "Load balancer requests/s by status": lambda values: any(v > 0 for v in values),
        "Load balancer errors/s": lambda values: len(values) == 4,
    }
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    for title, check in expected.items():
        exprs = [t["expr"].replace("$__rate_interval", "1m") for t in panels[title]["targets"]]

        def answered(exprs=exprs, check=check):
            values = [float(r["value"][1]) for expr in exprs for r in stack.query(expr)]
            return all(math.isfinite(v) for v in values) and check(values)

        wait_for(answered, 90, interval=1.0, message=f"panel {title!r} ({exprs}) to show the fleet")


def test_every_replica_moves_to_a_new_checkpoint_with_no_failed_request(stack):
    before = stack.fleet_serving(REPLICAS)
    traffic = Traffic(stack.api)
    try:
        output = stack.compose.ok(
            "run", "--rm", "-T", "trainer",
            "trainer", "fit", "--steps", "30", "--eval-interval", "15", "--no-resume", "--seed", "11",
            "--data", "builtin:pydoc", "--out", "/checkpoints",
        )  # fmt: skip
        saved = [int(line.rsplit("step ", 1)[1].split(")")[0]) for line in output.splitlines()
                 if line.startswith("Saved best model")]  # fmt: skip
        step = saved[-1]
        assert step != before
        # /health of every replica names the new checkpoint, and the balancer sends to all of them.
        stack.fleet_serving(REPLICAS, step)
        traffic.more(10, "requests answered on the new checkpoint")
    finally:
        traffic.stop()
    steps = traffic.steps
    # Each publication of the run was served in turn; the last request got the last one.
    assert set(steps) <= {before, *saved} and steps[-1] == step, (saved, steps)


def test_scaling_to_one_replica_and_back_loses_no_request(stack):
    step = stack.fleet_serving(REPLICAS)
    traffic = Traffic(stack.api)
    try:
        traffic.more(5, "requests answered before scaling down")
        stack.compose.ok("up", "-d", "--scale", "api=1", "api")
        assert len(stack.replicas()) == 1
        traffic.more(10, "requests answered by the one replica left")
        stack.compose.ok("up", "-d", "--scale", f"api={REPLICAS}", "api")
        stack.fleet_serving(REPLICAS, step)
        traffic.more(10, "requests answered after scaling back up")
    finally:
        answers = traffic.stop()
    # One checkpoint throughout: each body got one text, whichever replica answered it.
    texts = {}
    for body, answer in answers:
        texts.setdefault(body["prompt"], set()).add(answer["text"])
    assert all(len(seen) == 1 for seen in texts.values()), texts


def test_a_replica_killed_mid_stream_fails_only_its_own_streams(stack):
    stack.fleet_serving(REPLICAS)
    began = time.monotonic()
    rate = stack.predict(prompt="Warm", max_new_tokens=200, seed=2)["usage"]["completion_tokens"] / (
        time.monotonic() - began
    )
    body = {"prompt": "Kill", "max_new_tokens": int(min(max(rate * STREAM_SECONDS, 200), 4000)), "seed": 4}
    streams = [([], threading.Event()) for _ in range(2 * REPLICAS)]
    errors: dict[int, Exception] = {}

    def client(i: int) -> None:
        try:
            stack.stream(*streams[i], **body)
        except httpx.HTTPError as e:
            errors[i] = e

    # Each replica's processes are listed before the streams start, so that the one to kill can be frozen
    # the moment its running streams are counted: no stream of its can end between the count and the kill.
    replicas = [(c, stack.compose.address(c, 8000), stack.pids(c)) for c in stack.compose.containers("api")]
    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(streams))]
    for thread in clients:
        thread.start()
    assert all(first.wait(120) for _, first in streams), "the streams never started"
    counts = [Scrape(httpx.get(f"{address}/metrics", timeout=10).text).get("gpt_num_requests_running")
              for _, address, _ in replicas]  # fmt: skip
    # The replica running the most streams is killed (least connections should give each two).
    killed = max(range(len(replicas)), key=counts.__getitem__)
    victim, _, pids = replicas[killed]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    os.kill(victim["State"]["Pid"], signal.SIGKILL)
    for thread in clients:
        thread.join(300)
    # The killed replica's streams end cut, which the client sees (no [DONE], an incomplete chunked body);
    # every other stream finishes.
    assert len(errors) == counts[killed] > 0, (counts, errors, stack.balancer_sessions())
    assert all(isinstance(e, (httpx.RemoteProtocolError, httpx.ReadError)) for e in errors.values()), errors
    for i, (events, _) in enumerate(streams):
        if i not in errors:
            assert events[-1] == "[DONE]" and json.loads(events[-2])["finish_reason"] == "length", events[-2:]
    # New requests go to the replicas left: a connection to the dead one is retried on another.
    traffic = Traffic(stack.api)
    try:
        traffic.more(20, "requests answered after the kill")
    finally:
        traffic.stop()
    # Docker starts the killed replica again (restart: unless-stopped), and it serves.
    stack.fleet_serving(REPLICAS)


def test_two_trainer_nodes_train_as_one_node_of_two_processes(stack):
    """torchrun across two containers (a c10d rendezvous at node 0, rank 0 publishing) ends with the weights
    and the loss curve of one container running two processes."""
    multinode = ("--profile", "multinode")
    stack.compose.ok(*multinode, "up", "-d", *NODES)
    stack.nodes_finished()
    stack.compose.ok(*multinode, "run", "--rm", "-T", "--no-deps", NODES[0], "sh", "-c", ONE_NODE)
    compared = stack.compare_runs("/checkpoints", "/checkpoints/one-node")
    assert compared["same_tensors"] and compared["steps"] == [list(range(1, 21))] * 2, compared
    # Bit for bit: the same arithmetic, the all-reduce of two ranks one addition, the same in either order.
    assert compared["weights"] == 0 and compared["losses"] == 0, compared
    stack.compose.ok(*multinode, "rm", "-f", "-s", *NODES)


def test_a_trainer_node_killed_mid_run_comes_back_and_the_run_resumes_to_the_same_weights(stack):
    """Node 1's container SIGKILLed mid-run, from the host as a crash would: Docker starts it again
    (restart: on-failure), torchrun restarts both nodes' workers (--max-restarts), they resume from last.pt
    and end on the uninterrupted run's weights."""
    multinode = ("--profile", "multinode")
    stack.compose.ok(*multinode, "run", "--rm", "-T", "--no-deps", NODES[0], "sh", "-c",
                     "mkdir /checkpoints/uninterrupted && mv /checkpoints/*.pt /checkpoints/metrics.jsonl "
                     "/checkpoints/uninterrupted/")  # fmt: skip
    stack.compose.ok(*multinode, "up", "-d", *NODES)
    node1 = stack.compose.container(NODES[1])
    [volume] = [Path(m["Source"]) for m in node1["Mounts"] if m["Destination"] == "/checkpoints"]
    wait_for(lambda: (volume / "last.pt").exists(), 600, interval=0.05, message="the run's first last.pt")
    # Node 1 stopped first, so node 0 waits in its next collective and the kill lands mid-run however busy
    # the machine is; then its init killed, which takes the whole container down.
    for pid in stack.pids(node1):
        os.kill(pid, signal.SIGSTOP)
    assert not (volume / "final_model.pt").exists(), "the run ended before the kill"
    os.kill(node1["State"]["Pid"], signal.SIGKILL)
    stack.nodes_finished()
    assert 5 <= resumed_step(stack.compose.logs(*NODES, tail="all")) < 20
    compared = stack.compare_runs("/checkpoints", "/checkpoints/uninterrupted")
    assert compared["same_tensors"] and compared["weights"] == 0, compared
    assert stack.compose.engine.inspect("container", node1["Id"])[0]["RestartCount"] >= 1
    stack.compose.ok(*multinode, "rm", "-f", "-s", *NODES)


def test_down_leaves_nothing_of_the_project(stack):
    # The multinode profile ran above: Compose v2 removes a profile's volumes only with the profile named.
    stack.compose.ok("--profile", "multinode", "down", "--volumes")
    assert stack.compose.leftovers() == {}
