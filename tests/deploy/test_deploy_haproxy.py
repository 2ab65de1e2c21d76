"""The load balancer's promises, kept by Debian's HAProxy reading the compose file's own configuration
(deploy/haproxy/haproxy.cfg) in front of two real services: only replicas whose /health says ready get
requests, least connections spreads open streams, a stream passes unbuffered with its request id, a
soft stop (`docker stop` sends SIGUSR1) lets a running stream finish, and replicas stopped under traffic
lose none of it. Compose's Docker DNS discovery is proved in `make test-compose`."""

import json
import os
import re
import signal
import threading

import httpx
import processes
import pytest
from lbkit import TRAFFIC_BODIES, Traffic, start_haproxy
from servicekit import publish, wait_for

from service.settings import ServiceSettings

# A generation of 1,000 tokens takes the tiny model about three seconds: long enough that the workers are
# paused while it runs, and a try that ended before that is made again.
LONG = 1000
TRIES = 5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, launch_for_module):
    """A replica serving step 10 and one waiting for its first checkpoint, behind the balancer."""
    ready_dir, waiting_dir = tmp_path_factory.mktemp("ready"), tmp_path_factory.mktemp("waiting")
    publish(ready_dir, step=10)
    ready, waiting = launch_for_module(ready_dir), launch_for_module(waiting_dir)
    balancer = start_haproxy(tmp_path_factory.mktemp("haproxy"), ready, waiting)
    yield ready, waiting, balancer
    processes.stop(balancer.process)


class Stream(threading.Thread):
    """A streamed /predict through `url`, read in the background: the response headers, every event, and
    `first` set when the first event has arrived."""

    def __init__(self, url: str, **body):
        super().__init__(daemon=True)
        self.url, self.body = url, {"prompt": "Far", "max_new_tokens": LONG, "seed": 1, **body, "stream": True}
        self.first, self.headers, self.events = threading.Event(), {}, []
        self.start()

    def run(self):
        with httpx.stream("POST", f"{self.url}/predict", json=self.body, timeout=120) as response:
            self.headers = response.headers
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    self.first.set()

    def result(self) -> dict:
        self.join(120)
        assert self.events[-1] == "[DONE]", self.events[-3:]
        return json.loads(self.events[-2])


def workers(*services) -> list[int]:
    return [pid for service in services for pid in service.metrics().pids("worker")]


def pause(pids: list[int], signum: int) -> None:
    for pid in pids:
        os.kill(pid, signum)


def running(*services) -> float:
    return sum(service.metrics().get("gpt_num_requests_running") for service in services)


def served_step(url: str, prompt: str) -> int | str:
    """The checkpoint step of the replica that answered a short request (one sent to the paused replica
    cannot be answered)."""
    try:
        return httpx.post(f"{url}/predict", json={"prompt": prompt, "max_new_tokens": 4}, timeout=30).json()[
            "model"]["step"]  # fmt: skip
    except httpx.ReadTimeout:
        return "sent to the busy replica"


def mid_stream(url: str, prompt: str, replicas, while_paused=lambda: None) -> tuple[Stream, dict]:
    """Start streams through `url` until one is caught generating: its first event in and the workers of
    `replicas()` (asked once the stream runs) stopped with exactly that request running. Runs `while_paused`
    then, lets the workers go on, and returns the stream and its last event. A stream may end before its
    workers can be stopped, so up to TRIES are started."""
    for _ in range(TRIES):
        stream = Stream(url, prompt=prompt)
        assert stream.first.wait(60), "the stream never started"
        services = replicas()
        paused = workers(*services)
        pause(paused, signal.SIGSTOP)
        try:
            caught = running(*services) == 1
            if caught:
                while_paused()
        finally:
            pause(paused, signal.SIGCONT)
        last = stream.result()
        if caught:
            return stream, last
    pytest.fail(f"each of {TRIES} streams ended before the workers could be paused")


def test_only_ready_replicas_get_requests_and_open_streams_go_to_the_least_busy(fleet, tmp_path):
    ready, waiting, balancer = fleet
    assert waiting.health().status_code == 503
    wait_for(lambda: balancer.active_servers() == 1, 30, interval=0.2, message="the ready replica to be checked up")
    with httpx.Client(base_url=balancer.url, timeout=60) as client:
        for i in range(6):
            response = client.post("/predict", json={"prompt": f"Ready {i}", "max_new_tokens": 4})
            assert response.status_code == 200 and response.json()["model"]["step"] == 10, response.text
    answered = waiting.metrics().samples
    assert not any(name == "gpt_requests_total" and value for (name, _), value in answered.items()), answered

    publish(waiting.checkpoint_dir, step=20)
    waiting.wait_serving(20)
    wait_for(lambda: balancer.active_servers() == 2, 30, interval=0.2, message="the second replica to be checked up")
    # A stream held open on one replica (its worker paused once the stream runs): every request after it
    # goes to the other, which has fewer connections. Round robin would send every second one to the busy one.
    by_server = {"api1": ready, "api2": waiting}
    steps = []

    def busy():
        [name] = [name for name, count in balancer.sessions().items() if count]
        return (by_server[name],)

    _, last = mid_stream(balancer.url, "Far", busy,
                         lambda: steps.extend(served_step(balancer.url, f"Next {i}") for i in range(4)))
    held = last["model"]["step"]
    assert held in (10, 20) and steps == [30 - held] * 4, (held, steps)


def test_a_stream_passes_unbuffered_and_keeps_the_replicas_request_id(fleet):
    ready, waiting, balancer = fleet
    # The first event is here while the generation still runs: the balancer held nothing back.
    stream, last = mid_stream(balancer.url, "Unbuffered", lambda: (ready, waiting))
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == LONG
    request_id = stream.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    # A replica logs a request once its response has gone, which may be just after the client read the end.
    logged = wait_for(
        lambda: [s for s in (ready, waiting) if f'"request_id": "{request_id}"' in s.log()], 10,
        message="the request id the client got in a replica's access log",
    )  # fmt: skip
    assert len(logged) == 1


def test_a_soft_stop_refuses_new_connections_and_lets_the_running_stream_finish(fleet, tmp_path):
    ready, _, _ = fleet
    balancer = start_haproxy(tmp_path, ready)
    wait_for(lambda: balancer.active_servers() == 1, 30, interval=0.2, message="the replica to be checked up")

    def soft_stop():
        balancer.process.send_signal(signal.SIGUSR1)
        wait_for(refused, 30, interval=0.05, message="the balancer to stop listening")

    def refused():
        try:
            httpx.get(f"{balancer.url}/health", timeout=5)
        except httpx.ConnectError:
            return True
        return False

    try:
        _, last = mid_stream(balancer.url, "Soft stop", lambda: (ready,), soft_stop)
    except pytest.fail.Exception:
        processes.stop(balancer.process)
        raise
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == LONG
    assert balancer.process.wait(timeout=60) == 0


def test_replicas_stopped_under_traffic_lose_no_request(fleet, launch, tmp_path):
    """SIGTERM to two of three replicas while three clients send request after request: every request is
    answered, each with the text its seed gives on any replica of the checkpoint. A stopping replica says
    so on /health while it still serves, and the balancer's checks take it out before it stops listening."""
    ready, _, _ = fleet
    # The default grace, which the balancer's checks must fit in (servicekit gives its services none).
    grace = {"SERVICE_ACCEPT_GRACE": str(ServiceSettings.model_fields["accept_grace"].default)}
    # --dtype auto times both precisions at load: the replicas must compute as the survivor does.
    [dtype] = {worker["dtype"] for worker in ready.health().json()["workers"]}
    leaving = [launch(ready.checkpoint_dir, "--dtype", dtype, env=grace) for _ in range(2)]
    for replica in leaving:
        replica.wait_serving(10)
    balancer = start_haproxy(tmp_path, ready, *leaving)
    wait_for(lambda: balancer.active_servers() == 3, 30, interval=0.2, message="the three replicas to be checked up")
    expected = {body["prompt"]: ready.predict(**body)["text"] for body in TRAFFIC_BODIES}
    traffic = Traffic(balancer.url)
    try:
        traffic.more(30, "requests answered by the three replicas")
        answered = [sum(v for (name, _), v in replica.metrics().samples.items() if name == "gpt_requests_total")
                    for replica in leaving]  # fmt: skip
        for replica in leaving:
            replica.process.send_signal(signal.SIGTERM)
        assert [replica.process.wait(timeout=120) for replica in leaving] == [0, 0]
        traffic.more(30, "requests answered by the replica left")
    finally:
        try:
            answers = traffic.stop()
        finally:
            processes.stop(balancer.process)
    assert all(answered), f"a stopped replica had answered nothing before its stop: {answered}"
    # Each was taken out by its /health (503) while it still listened, not by a refused connection.
    downs = set(re.findall(r"Server api/(api\d) is DOWN, reason: ([^,]+),", balancer.log()))
    assert downs == {("api2", "Layer7 wrong status"), ("api3", "Layer7 wrong status")}, downs
    wrong = [(body["prompt"], answer["text"]) for body, answer in answers if answer["text"] != expected[body["prompt"]]]
    assert not wrong, wrong
