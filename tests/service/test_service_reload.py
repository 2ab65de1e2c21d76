"""Readiness before the first checkpoint, hot reload under traffic, and refusal of bad checkpoints.

These tests share one service started over an empty checkpoint folder and run in file order: the
first one needs the folder still empty. The service groups streamed tokens (--stream-interval), so
the reload tests also show that grouping changes nothing in the text. It has a draft model from the
start (one draft token a step, whatever it pays), which it loads only once a model is served (in that
model's precision) and which every reloaded model drafts with.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from servicekit import publish, tiny_model, wait_for

from model import save_checkpoint


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory):
    draft = publish(tmp_path_factory.mktemp("draft"), step=3, seed=3, name="draft.pt")
    return launch_for_module(
        tmp_path_factory.mktemp("checkpoints"), "--max-batch-size", "8", "--stream-interval", "0.05",
        "--draft-checkpoint", str(draft), "--draft-length", "1",
    )  # fmt: skip


def drafted_by_the_model(service) -> float:
    return service.metrics().get("gpt_speculation_proposed_tokens_total", source="draft")


def test_without_a_checkpoint_it_is_live_but_not_ready(service):
    assert httpx.get(service.url + "/live").status_code == 200
    health = service.health()
    assert health.status_code == 503
    message = health.json()["message"]
    assert str(service.checkpoint_dir) in message and "waiting for a checkpoint" in message
    with service.client() as client:
        for stream in (False, True):
            response = client.post("/predict", json={"prompt": "Hello", "stream": stream})
            assert response.status_code == 503
            assert response.json()["error"]["message"] == message
        response = client.post("/v1/completions", json={"model": "gpt", "prompt": "Hello"})
        assert response.status_code == 503 and response.json()["error"]["message"] == message
    assert [worker["draft"] for worker in health.json()["workers"]] == [None]
    assert service.metrics().get("gpt_draft_reloads_total", result="success") == 0


def test_a_published_checkpoint_is_served_without_a_restart(service):
    publish(service.checkpoint_dir, step=1, val_loss=4.0, seed=1)
    # At the next poll (0.2 s here) plus the load: how soon is a benchmark's question, not this test's.
    service.wait_serving(step=1, timeout=60)
    body = service.predict(prompt="Hello", max_new_tokens=5)
    assert body["model"] == {"step": 1, "val_loss": 4.0, "checkpoint": "best_model.pt"}
    # Loaded with the first model, before that model took requests (and /health said ready).
    [worker] = service.health().json()["workers"]
    assert worker["draft"]["checkpoint"] == "draft.pt" and worker["draft"]["step"] == 3


def test_a_stream_interval_groups_tokens_without_changing_the_text(service):
    request = {"prompt": "Grouped", "max_new_tokens": 300, "seed": 9}
    events = service.stream(**request)
    assert "".join(event["text"] for _, event in events) == service.predict(**request)["text"]
    assert events[-1][1]["usage"]["completion_tokens"] == 300
    # Fewer events than tokens.
    assert len(events) < 300 / 2


def test_hot_reload_under_traffic_fails_nothing_and_running_requests_keep_their_weights(service):
    publish(service.checkpoint_dir, step=10, seed=10)
    service.wait_serving(step=10)
    long_request = {"prompt": "A long greedy story", "max_new_tokens": 900, "temperature": 0}
    expected = service.predict(**long_request)["text"]

    stop = threading.Event()
    answers, failures = [], []

    def traffic(i):
        with service.client() as client:
            while not stop.is_set():
                response = client.post("/predict", json={"prompt": f"Busy {i}", "max_new_tokens": 8, "seed": i})
                (answers if response.status_code == 200 else failures).append(response)

    with ThreadPoolExecutor(5) as pool:
        for i in range(4):
            pool.submit(traffic, i)
        try:
            long_running = threading.Event()
            long = pool.submit(service.stream, first=long_running, **long_request)
            assert long_running.wait(30)
            publish(service.checkpoint_dir, step=11, seed=11)
            reloaded_at = service.wait_serving(step=11)
            events = long.result()
            wait_for(
                lambda: any(r.json()["model"]["step"] == 11 for r in list(answers)), 10, message="traffic on step 11"
            )
        finally:
            stop.set()

    assert failures == []
    final = events[-1][1]
    assert final["model"]["step"] == 10
    assert "".join(event["text"] for _, event in events) == expected
    # The long request was still producing tokens after the new weights were being served.
    assert events[-1][0] > reloaded_at
    assert {response.json()["model"]["step"] for response in answers} == {10, 11}
    assert service.predict(prompt="After", max_new_tokens=3)["model"]["step"] == 11


def foreign_checkpoint(path):
    torch.save({"state_dict": tiny_model().state_dict(), "epoch": 3}, path)


def other_tokenizer_checkpoint(path):
    save_checkpoint(path, tiny_model(), step=99, tokenizer="cl100k_base")


def mismatched_weights_checkpoint(path):
    data = torch.load(path, weights_only=True)
    data["config"]["n_embd"] = 64
    torch.save(data, path)


def truncated_checkpoint(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def random_bytes(path):
    path.write_bytes(os.urandom(4096))


def other_shape_checkpoint(path):
    publish(path.parent, step=99, name=path.name, n_layer=3)


@pytest.mark.parametrize(
    "spoil",
    [
        truncated_checkpoint,
        random_bytes,
        foreign_checkpoint,
        other_tokenizer_checkpoint,
        mismatched_weights_checkpoint,
        other_shape_checkpoint,
    ],
)
def test_a_bad_checkpoint_is_refused_and_the_previous_model_keeps_serving(service, spoil, tmp_path):
    good = publish(service.checkpoint_dir, step=20, seed=20)
    service.wait_serving(step=20)
    before = service.metrics().get("gpt_model_reloads_total", result="failure")

    staged = publish(tmp_path, step=99, seed=99)
    spoil(staged)
    os.replace(staged, good)  # published atomically, like the trainer
    wait_for(
        lambda: service.metrics().get("gpt_model_reloads_total", result="failure") == before + 1,
        10,
        message="the failed reload to be counted",
    )
    assert service.predict(prompt="Still here", max_new_tokens=3)["model"]["step"] == 20
    assert service.health().status_code == 200
    assert "refused checkpoint" in service.log()

    publish(service.checkpoint_dir, step=21, seed=21)
    service.wait_serving(step=21)


def test_a_reloaded_model_drafts_with_the_draft_model_and_changes_no_text(service):
    publish(service.checkpoint_dir, step=30, seed=30)
    service.wait_serving(step=30)
    request = {"prompt": "Drafted on the new weights", "max_new_tokens": 20, "seed": 3}
    before = drafted_by_the_model(service)
    body = service.predict(**request)
    assert body["model"]["step"] == 30
    assert drafted_by_the_model(service) > before
    assert body["text"] == service.predict(**request, speculate=False)["text"]
