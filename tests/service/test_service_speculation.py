"""Speculative decoding in the service: the same seeded text with drafts checked or not, drafted tokens in
the usage, the access log and the metrics, a draft model hot-swapped under a running stream, and a bad
draft file refused.

One service for the file, drafting with a checkpoint folder's best_model.pt. The first draft has the
served model's own weights, so that nearly every draft token is kept; --draft-length 4 makes it draft
although a draft as large as the target does not pay. The tests run in file order: the swap test
replaces that draft with other weights, and the bad-file test expects the swapped one.
"""

from __future__ import annotations

import json
import os
import threading
import time

import openai
import pytest
from servicekit import publish, tiny_model, wait_for

from model import save_checkpoint

LONG = 900
SETTINGS = [
    {"temperature": 0},
    {"temperature": 0.8, "seed": 3},
    {"temperature": 1.0, "top_k": 1000, "top_p": 0.9, "seed": 4},
]
# Greedy decoding of the tiny model falls into a loop that prompt lookup then predicts.
REPEATING = "one two three four five one two three four five one two three four five one two"


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafts")
    publish(folder, step=5, val_loss=3.5, seed=0)
    return folder


@pytest.fixture(scope="module")
def service(launch_for_module, tmp_path_factory, drafts):
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoints, step=1, seed=0)
    return launch_for_module(
        checkpoints, "--draft-checkpoint", str(drafts), "--draft-length", "4", "--max-batch-size", "4",
        "--stream-interval", "0",
    )  # fmt: skip


def draft_of(service) -> dict | None:
    [worker] = service.health().json()["workers"]
    return worker["draft"]


def test_health_names_the_loaded_draft(service):
    draft = draft_of(service)
    assert draft["loaded_at"] > 0
    assert {key: draft[key] for key in ("checkpoint", "step", "val_loss")} == {
        "checkpoint": "best_model.pt", "step": 5, "val_loss": 3.5,
    }  # fmt: skip


@pytest.mark.parametrize("sampling", SETTINGS)
def test_speculation_on_and_off_give_the_same_text_and_count_the_drafted_tokens(service, sampling):
    request = {"prompt": "Once upon a time", "max_new_tokens": 60, **sampling}
    on = service.predict(**request, speculate=True)
    off = service.predict(**request, speculate=False)
    assert on["text"] == off["text"]
    assert on["usage"]["completion_tokens"] == off["usage"]["completion_tokens"] == 60
    # The draft is the served model: nearly every token but the first (from the prefill) was drafted.
    assert 60 / 2 < on["usage"]["drafted_tokens"] < 60
    assert off["usage"]["drafted_tokens"] == 0
    # The service's default (--speculation) drafts, and streaming changes nothing.
    events = [event for _, event in service.stream(**request)]
    assert "".join(event["text"] for event in events) == on["text"]
    assert 60 / 2 < events[-1]["usage"]["drafted_tokens"] < 60


def test_completions_report_drafted_tokens_in_the_usage_details(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)
    request = dict(model="gpt", prompt="Far away", max_tokens=40, seed=8, temperature=0.9)
    on = client.completions.create(**request)
    off = client.completions.create(**request, extra_body={"speculate": False})
    assert on.choices[0].text == off.choices[0].text
    assert 40 / 2 < on.usage.completion_tokens_details.drafted_tokens < 40
    assert off.usage.completion_tokens_details.drafted_tokens == 0
    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == on.choices[0].text
    assert chunks[-1].usage.completion_tokens_details.drafted_tokens > 40 / 2


def test_prompt_lookup_drafts_a_repeating_text(service):
    request = {"prompt": REPEATING, "max_new_tokens": 200, "temperature": 0}
    before = service.metrics()
    on = service.predict(**request)
    after = service.metrics()
    assert on["text"] == service.predict(**request, speculate=False)["text"]
    proposed = after.get("gpt_speculation_proposed_tokens_total", source="lookup")
    accepted = after.get("gpt_speculation_accepted_tokens_total", source="lookup")
    assert accepted - before.get("gpt_speculation_accepted_tokens_total", source="lookup") > 0
    assert accepted <= proposed


def test_metrics_and_the_access_log_count_rows_passes_and_drafted_tokens(service):
    before = service.metrics()
    with service.client() as client:
        response = client.post("/predict", json={"prompt": "Count the passes", "max_new_tokens": 50, "seed": 1})
    body = response.json()
    after = service.metrics()

    def delta(name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    drafted = body["usage"]["drafted_tokens"]
    assert drafted > 50 / 2
    passes = delta("gpt_speculation_tokens_per_pass_count")
    # The first token comes from the prefill, every other one from a decode pass: 1 + its kept drafts.
    assert delta("gpt_speculation_tokens_per_pass_sum") == 49
    assert passes == 49 - drafted
    # One row a step, however many tokens the step gave it.
    assert delta("gpt_batch_size_count") == delta("gpt_batch_size_sum") == 1 + passes
    assert delta("gpt_generation_tokens_total") == 50
    assert delta("gpt_inter_token_latency_seconds_count") == 49
    assert delta("gpt_time_to_first_token_seconds_count") == 1
    accepted = sum(delta("gpt_speculation_accepted_tokens_total", source=s) for s in ("lookup", "draft"))
    proposed = sum(delta("gpt_speculation_proposed_tokens_total", source=s) for s in ("lookup", "draft"))
    assert accepted == drafted
    assert accepted <= proposed <= 4 * passes

    request_id = response.headers["x-request-id"]

    def logged():
        lines = [line for line in service.log().splitlines() if request_id in line]
        return lines and json.loads(lines[0][lines[0].index("{") :])

    entry = wait_for(logged, 10, message="the access log line")
    assert entry["completion_tokens"] == 50 and entry["drafted_tokens"] == drafted


def test_speculate_must_be_a_boolean(service):
    with service.client() as client:
        response = client.post("/predict", json={"prompt": "Hi", "speculate": "x"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "speculate" and error["message"].startswith("speculate: ")
        # The OpenAI route answers every malformed field with 400, as OpenAI does.
        response = client.post("/v1/completions", json={"model": "gpt", "prompt": "Hi", "speculate": 1})
        assert response.status_code == 400 and response.json()["error"]["param"] == "speculate"


def test_a_draft_swapped_under_a_running_stream_changes_none_of_its_text(service, drafts):
    request = {"prompt": "A long story", "max_new_tokens": LONG, "temperature": 0.9, "seed": 21}
    expected = service.predict(**request, speculate=False)["text"]
    probe = {"prompt": "Which draft?", "max_new_tokens": 40, "seed": 5}
    drafted_before = service.predict(**probe)["usage"]["drafted_tokens"]
    running = threading.Event()
    result: list = []
    stream = threading.Thread(target=lambda: result.append(service.stream(first=running, **request)))
    stream.start()
    try:
        assert running.wait(30)
        # Other weights: their drafts are mostly dropped, which must change no token either.
        publish(drafts, step=6, val_loss=3.0, seed=7)
        swapped_at = wait_for(lambda: draft_of(service)["step"] == 6 and time.monotonic(), 30, message="the swap")
    finally:
        stream.join(120)
    [events] = result
    assert "".join(event["text"] for _, event in events) == expected
    assert events[-1][1]["usage"]["completion_tokens"] == LONG
    # The stream was still running when the new draft was being used.
    assert events[-1][0] > swapped_at
    # The new draft is the one drafting: its guesses at the served model's tokens are mostly wrong.
    assert service.predict(**probe)["usage"]["drafted_tokens"] < drafted_before / 2


def other_tokenizer(path):
    save_checkpoint(path, tiny_model(), step=99, tokenizer="cl100k_base")


def random_bytes(path):
    path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("spoil", [other_tokenizer, random_bytes])
def test_a_bad_draft_file_is_refused_and_the_previous_draft_keeps_drafting(service, drafts, tmp_path, spoil):
    assert draft_of(service)["step"] == 6
    failures = service.metrics().get("gpt_draft_reloads_total", result="failure")
    staged = tmp_path / "draft.pt"
    spoil(staged)
    os.replace(staged, drafts / "best_model.pt")  # published atomically, like the trainer
    wait_for(
        lambda: service.metrics().get("gpt_draft_reloads_total", result="failure") == failures + 1,
        30,
        message="the refused draft to be counted",
    )
    assert "refused draft checkpoint" in service.log()
    assert service.health().status_code == 200
    assert draft_of(service)["step"] == 6
    before = service.metrics().get("gpt_speculation_proposed_tokens_total", source="draft")
    request = {"prompt": "Still drafting", "max_new_tokens": 30, "seed": 2}
    assert service.predict(**request)["text"] == service.predict(**request, speculate=False)["text"]
    assert service.metrics().get("gpt_speculation_proposed_tokens_total", source="draft") > before
