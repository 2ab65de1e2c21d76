"""Security basics: the API key on every generation route, no secret anywhere it could leak, containers
that do not run as root, and no request that makes the service touch a path of the client's choosing.

tests/service/test_service_validation.py checks 401 on each route for a missing key, a wrong one and
other schemes; here the routes come from the service's own route table (a new one must be classified),
streamed requests and near-miss keys are refused too, and the proofs of "no leak" and "no path" are
made against the live processes and the file system.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
from pathlib import Path

import httpx
import processes
import pytest
from servicekit import API_KEY, publish


ROOT = Path(__file__).resolve().parents[2]
OPEN_ROUTES = {"/", "/live", "/info", "/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
# The page's files are the same for everyone and hold no data; the page must load to ask for the key.
OPEN_ROUTES |= {"/static/page.css", "/static/page.js", "/static/icon.svg"}
GENERATION_ROUTES = {"/predict": "POST", "/v1/completions": "POST", "/v1/models": "GET", "/v1/models/{model_id}": "GET",
                     "/v1/training": "GET"}  # fmt: skip
WRONG_KEY = "wrong-key-that-must-not-leak-5f2b"
NEAR_MISSES = [None, f"Bearer {WRONG_KEY}", f"Bearer {API_KEY[:-1]}", f"Bearer {API_KEY}x", f"Bearer {API_KEY.upper()}",
               f"Token {API_KEY}", API_KEY, f"Bearer  {API_KEY[1:]}"]  # fmt: skip


def route_table(service) -> set[str]:
    # FastAPI lists every route it serves in its schema, including the probes (but not the schema pages).
    return set(httpx.get(service.url + "/openapi.json").json()["paths"]) | {"/openapi.json"}


def method(path: str) -> str:
    return GENERATION_ROUTES.get(path) or GENERATION_ROUTES["/v1/models/{model_id}"]


def test_every_route_is_either_open_or_needs_the_key(reliable):
    routes = route_table(reliable)
    assert routes - OPEN_ROUTES == set(GENERATION_ROUTES), "classify the new route here: open, or behind the key"


@pytest.mark.parametrize(
    "path, stream", [("/predict", False), ("/predict", True), ("/v1/completions", False),
                     ("/v1/completions", True), ("/v1/models", False), ("/v1/models/gpt", False),
                     ("/v1/training", False)]  # fmt: skip
)
def test_generation_routes_refuse_every_near_miss_key_before_generating(reliable, path, stream):
    body = {"prompt": "Let me in", "max_new_tokens": 2, "stream": stream}
    if path == "/v1/completions":
        body = {"model": "gpt", "prompt": "Let me in", "max_tokens": 2, "stream": stream}
    generated = reliable.metrics().get("gpt_generation_tokens_total")
    for authorization in NEAR_MISSES:
        headers = {"authorization": authorization} if authorization else {}
        response = httpx.request(method(path), reliable.url + path, headers=headers, json=body)
        assert response.status_code == 401, (authorization, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert "data:" not in response.text
    assert reliable.metrics().get("gpt_generation_tokens_total") == generated
    # The right key, for contrast.
    response = httpx.request(method(path), reliable.url + path, headers=reliable.headers, json=body)
    assert response.status_code == 200, response.text


def test_no_key_appears_in_logs_metrics_answers_or_process_listings(reliable):
    for key in (API_KEY, WRONG_KEY):
        with httpx.Client(base_url=reliable.url, headers={"authorization": f"Bearer {key}"}) as client:
            client.post("/predict", json={"prompt": "hello", "max_new_tokens": 2})
            client.post("/predict", json={"prompt": "hello", "stream": True, "max_new_tokens": 2})
            client.post("/v1/completions", json={"model": "gpt", "prompt": "hello", "max_tokens": 2})
            client.get("/v1/models")
    answers = {path: httpx.get(reliable.url + path, headers=reliable.headers).text
               for path in ("/metrics", "/health", "/info", "/openapi.json", "/v1/models", "/")}  # fmt: skip
    listings = {p.pid: Path(f"/proc/{p.pid}/cmdline").read_bytes().decode(errors="replace")
                for p in processes.tree(reliable.process.pid)}  # fmt: skip
    for key in (API_KEY, WRONG_KEY):
        assert key not in reliable.log()
        for path, text in answers.items():
            assert key not in text, path
        for pid, command in listings.items():
            assert key not in command, pid


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [tuple(line.split(None, 1)) + ("",) if " " not in line else tuple(line.split(None, 1))
            for line in lines if line and not line.startswith("#")]  # fmt: skip


def test_the_image_runs_as_an_unprivileged_user():
    # No Docker engine here: the Dockerfile's last stage must switch to a user other than root before it runs.
    instructions = dockerfile_instructions(ROOT / "deploy" / "Dockerfile")
    last_stage = max(i for i, (op, _) in enumerate(instructions) if op.upper() == "FROM")
    users = [(i, arg.strip()) for i, (op, arg) in enumerate(instructions) if i > last_stage and op.upper() == "USER"]
    assert users, "the image runs as root: add a USER instruction"
    where, user = users[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    starts = [i for i, (op, _) in enumerate(instructions) if op.upper() in ("CMD", "ENTRYPOINT")]
    assert starts and min(starts) > where
    # Compose files must not override it, nor hand out privileges.
    for compose in [ROOT / "docker-compose.yml", *ROOT.glob("deploy/docker-compose*.yml")]:
        text = compose.read_text()
        assert not re.search(r"^\s*user:\s*[\"']?(root|0)\b", text, re.M), compose
        assert not re.search(r"^\s*privileged:\s*true", text, re.M), compose


class FileWatch:
    """Every open, read, write, creation or deletion by any process in the watched folders (inotify)."""

    EVENT = struct.Struct("iIII")
    ALL_EVENTS = 0xFFF

    def __init__(self, *folders: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for folder in folders:
            assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), self.ALL_EVENTS) >= 0

    def events(self) -> list[tuple[int, str]]:
        found = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset < len(data):
                _, mask, _, length = self.EVENT.unpack_from(data, offset)
                name = data[offset + self.EVENT.size : offset + self.EVENT.size + length].rstrip(b"\0").decode()
                found.append((mask, name))
                offset += self.EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


def test_no_request_makes_the_service_touch_a_path_of_the_clients_choosing(reliable, tmp_path):
    bait_dir = tmp_path / "bait"
    bait = publish(bait_dir, step=666, name="bait.pt")  # a loadable checkpoint, were anything to load it
    served = reliable.health().json()["workers"]
    paths = [str(bait), str(bait_dir), os.path.relpath(bait, reliable.checkpoint_dir), "../" * 12 + str(bait)[1:]]
    settings_fields = ["checkpoint_dir", "checkpoint_name", "checkpoint", "init", "metrics_dir", "path", "file"]
    watch = FileWatch(bait_dir, reliable.checkpoint_dir)
    try:
        with httpx.Client(base_url=reliable.url, headers=reliable.headers, timeout=60.0) as client:
            for path in paths:
                extras = {field: path for field in settings_fields}
                answers = [
                    client.post("/predict", json={"prompt": path, "stop": [path], "max_new_tokens": 2}),
                    client.post("/predict", json={"prompt": "hi", "max_new_tokens": 2, **extras}),
                    client.post("/v1/completions", json={"model": path, "prompt": path, "max_tokens": 2}),
                    client.post("/v1/completions", json={"model": "gpt", "prompt": "hi", "max_tokens": 2,
                                                         "user": path, **extras}),  # fmt: skip
                    client.get("/v1/models", params={"path": path}),
                    client.get("/" + path.lstrip("/")),
                    client.get("/%2e%2e/" * 8 + str(bait).lstrip("/")),
                    client.get("/info", params={"file": path}),
                ]
                # Served, refused as an unknown field or model, or not found; never a file of the client's.
                assert [a.status_code for a in answers] == [200, 422, 404, 200, 200, 404, 404, 200], path
        touched = watch.events()
        bait.read_bytes()  # the watch itself works: this open and read are seen
        control = watch.events()
    finally:
        watch.close()
    assert touched == [], touched
    assert control and {name for _, name in control} == {"bait.pt"}
    assert reliable.health().json()["workers"] == served
