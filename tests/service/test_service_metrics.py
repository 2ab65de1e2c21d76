"""/metrics, the access log, and the bounded queue with cancellation of abandoned requests."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import processes
import pytest
from servicekit import wait_for

from model import Tokenizer

HISTOGRAMS = [
    "gpt_e2e_request_latency_seconds",
    "gpt_time_to_first_token_seconds",
    "gpt_inter_token_latency_seconds",
    "gpt_request_queue_time_seconds",
]


def test_scrape_passes_promtool_after_traffic(served):
    served.predict(prompt="Lint me", max_new_tokens=5)
    with served.client() as client:
        client.post("/predict", json={"prompt": ""})
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' (apt-get install -y prometheus)")
    text = served.metrics().text
    result = processes.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "a metric family appears twice"


def test_metrics_move_by_exactly_what_known_requests_did(served):
    prompt = "Count my tokens please"
    prompt_tokens = len(Tokenizer().encode(prompt))
    before = served.metrics()
    served.predict(prompt=prompt, max_new_tokens=17, seed=1)
    with served.client() as client:
        client.post("/v1/completions", json={"model": "gpt", "prompt": prompt, "max_tokens": 9, "seed": 2})
        client.post("/predict", json={"prompt": prompt, "top_k": 0})
    after = served.metrics()

    def delta(name, **labels):
        return after.get(name, **labels) - before.get(name, **labels)

    assert delta("gpt_generation_tokens_total") == 17 + 9
    assert delta("gpt_prompt_tokens_total") == 2 * prompt_tokens
    assert delta("gpt_requests_total", endpoint="/predict", status="200", finish_reason="length") == 1
    assert delta("gpt_requests_total", endpoint="/v1/completions", status="200", finish_reason="length") == 1
    assert delta("gpt_requests_total", endpoint="/predict", status="422", finish_reason="none") == 1
    assert delta("gpt_e2e_request_latency_seconds_count") == 2
    assert delta("gpt_time_to_first_token_seconds_count") == 2
    assert delta("gpt_request_queue_time_seconds_count") == 2
    assert delta("gpt_inter_token_latency_seconds_count") == 16 + 8
    # Every token after the first comes from a decode pass, several where drafts were kept; each request ran
    # alone, one row a step (its prefill, then its passes).
    passes = delta("gpt_speculation_tokens_per_pass_count")
    assert delta("gpt_speculation_tokens_per_pass_sum") == 16 + 8
    assert delta("gpt_batch_size_sum") == delta("gpt_batch_size_count") == 2 + passes
    for name in HISTOGRAMS:
        assert delta(f"{name}_sum") > 0
        # Buckets resolve a small model: the first one is a millisecond.
        assert ("le", "0.001") in dict.fromkeys(
            label for (sample, labels), _ in after.samples.items() if sample == f"{name}_bucket" for label in labels
        )
    assert after.get("gpt_num_requests_running") == 0
    assert after.get("gpt_num_requests_waiting") == 0
    assert after.get("gpt_model_step") == 100
    assert after.get("gpt_model_val_loss") == 3.25
    assert after.get("gpt_model_reloads_total", result="success") == 1
    assert after.get("gpt_model_reloads_total", result="failure") == 0


def test_process_metrics_describe_every_service_process(served):
    scrape = served.metrics()
    rss = {
        dict(labels)["role"]: value
        for (name, labels), value in scrape.samples.items()
        if name == "process_resident_memory_bytes"
    }
    assert {"main", "api", "worker"} <= set(rss)
    assert all(value > 10_000_000 for value in rss.values())
    for name in (
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
    ):
        roles = {dict(labels)["role"] for (sample, labels) in scrape.samples if sample == name}
        assert {"main", "api", "worker"} <= roles, name


def test_access_log_has_one_line_per_request_with_its_id(served):
    with served.client() as client:
        response = client.post("/predict", json={"prompt": "Log me", "max_new_tokens": 6})
    request_id = response.headers["x-request-id"]

    def logged():
        lines = [line for line in served.log().splitlines() if request_id in line]
        return lines and json.loads(lines[0][lines[0].index("{") :])

    entry = wait_for(logged, 10, message="the access log line")
    assert entry["status"] == 200 and entry["path"] == "/predict" and entry["method"] == "POST"
    assert entry["prompt_tokens"] == len(Tokenizer().encode("Log me")) and entry["completion_tokens"] == 6
    assert entry["finish_reason"] == "length" and entry["latency_ms"] > 0
    assert served.api_key not in served.log()


def test_a_full_queue_answers_429_and_abandoned_streams_free_their_rows(served):
    # The shared service holds 8 running and 8 queued requests: 20 long streams overflow it.
    wait_for(lambda: served.metrics().get("gpt_num_requests_running") == 0, 60, message="an idle start")
    release = threading.Event()
    before = served.metrics()
    # One client (its pool holds 100 connections) for all: opening 20 clients (an SSL context each) takes
    # seconds on a busy machine.
    client = served.client()

    def open_stream(i):
        body = {"prompt": f"Stream {i}", "max_new_tokens": 1000, "stream": True}
        with client.stream("POST", "/predict", json=body) as response:
            if response.status_code != 200:
                return response.status_code, response.headers.get("retry-after"), json.loads(response.read())
            lines = response.iter_lines()
            next(lines)  # the iterator stays referenced: dropping it would close the connection now
            release.wait(60)
            return 200, None, None  # leaving the block closes the connection mid-stream

    with client, ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(open_stream, i) for i in range(20)]
        try:
            wait_for(lambda: sum(f.done() for f in futures) >= 4, 60, message="the overflow to be refused")
        finally:
            release.set()
        results = [f.result() for f in futures]

    refused = [r for r in results if r[0] != 200]
    assert len(refused) == 4
    for status, retry_after, body in refused:
        assert status == 429 and retry_after == "1"
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"

    def idle():
        scrape = served.metrics()
        return scrape.get("gpt_num_requests_running") == 0 and scrape.get("gpt_num_requests_waiting") == 0 and scrape

    after = wait_for(idle, 10, message="cancelled requests to leave the batch")
    aborted = after.get("gpt_requests_total", endpoint="/predict", status="200", finish_reason="abort")
    assert aborted - before.get("gpt_requests_total", endpoint="/predict", status="200", finish_reason="abort") == 16
    # Nothing is generated for the abandoned requests any more.
    generated = after.get("gpt_generation_tokens_total")
    assert served.metrics().get("gpt_generation_tokens_total") == generated
    assert generated - before.get("gpt_generation_tokens_total") < 16 * 1000 / 2
    assert httpx.get(served.url + "/health").status_code == 200
