"""Generation through /predict: answers, streams, batching and continuous batching."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from servicekit import API_KEY, publish

from model import GPT, GPTConfig, Tokenizer, native, save_checkpoint

# How a CPU service packs its weights: for our decode kernels where they were built, else for oneDNN.
PACKED = r"packed for our decode kernels \(native \(\w+\)\)" if native.available() else "packed for oneDNN"


def test_predict_answers_text_usage_and_the_model_that_produced_it(served):
    with served.client() as client:
        response = client.post("/predict", json={"prompt": "Once upon a time", "max_new_tokens": 12, "seed": 3})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"text", "finish_reason", "usage", "model"}
    assert body["finish_reason"] == "length"
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "drafted_tokens"}
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(Tokenizer().encode("Once upon a time")), 12)
    # Tokens from kept drafts (the service speculates by default, here by prompt lookup); never the first, which
    # the prefill gives.
    assert 0 <= usage["drafted_tokens"] < 12
    assert body["model"] == {"step": 100, "val_loss": 3.25, "checkpoint": "best_model.pt"}
    assert body["text"]
    assert response.headers["x-model-step"] == "100"
    assert len(response.headers["x-request-id"]) == 32


def test_weights_packed_for_the_cpu_answer_what_plain_weights_answer(served, launch, tmp_path):
    publish(tmp_path, step=100, val_loss=3.25)
    # The same precision as the shared service's: --dtype auto may choose differently for another layout.
    dtype = served.health().json()["workers"][0]["dtype"]
    # Without our decode kernels too: the CPU's fallback serves the same texts and /health says why.
    plain = launch(tmp_path, "--no-pack-weights", "--dtype", dtype, api_key=API_KEY,
                   env={"GPT_KERNEL_ISA": "none"})
    assert plain.health().json()["kernels"] == "fallback (GPT_KERNEL_ISA=none)"
    assert served.health().json()["kernels"] == native.status()
    requests = [
        {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0},
        {"prompt": "The king", "max_new_tokens": 24, "seed": 7, "top_k": 20, "top_p": 0.9},
    ]
    for request in requests:
        assert served.predict(**request)["text"] == plain.predict(**request)["text"]
    # The precision is --dtype auto's choice on this machine; the layout is the point here.
    assert re.search(rf"serves \w+ weights, {PACKED} on cpu", served.log())
    assert re.search(r"serves \w+ weights, plain on cpu", plain.log())



def test_without_batch_invariance_requests_batched_together_answer_what_they_answer_alone(served, launch, tmp_path):
    """--no-batch-invariant's plain batched path (padded prefill, masked attention) computes the same
    texts: prompts of different lengths sent at once, against the invariant service's solo answers. It
    drafts nothing, whatever a request asks: drafts need batch invariance."""
    publish(tmp_path, step=100, val_loss=3.25)
    dtype = served.health().json()["workers"][0]["dtype"]
    plain = launch(tmp_path, "--no-batch-invariant", "--dtype", dtype, api_key=API_KEY)
    requests = [
        {"prompt": prompt, "max_new_tokens": 16 + 4 * i, "temperature": 0}
        for i, prompt in enumerate(["A", "Once upon a time there lived a king", "The", " word" * 80])
    ]
    alone = [served.predict(**request) for request in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: plain.predict(**request, speculate=True), requests))
    assert [body["text"] for body in together] == [body["text"] for body in alone]
    assert re.search(rf"serves \w+ weights, {PACKED}, not batch-invariant on cpu", plain.log())
    # Nothing is drafted, though every request asks and the repeated word gives prompt lookup drafts (the
    # speculating service's planner may or may not check them, by what it has measured: test_service_speculation
    # shows them drafted with a fixed draft length).
    assert [body["usage"]["drafted_tokens"] for body in together] == [0] * len(requests)
    assert "speculative decoding is off, whatever requests ask" in plain.log()


def test_a_seed_reproduces_and_another_seed_differs(served):
    first = served.predict(prompt="The king", max_new_tokens=20, seed=7)
    again = served.predict(prompt="The king", max_new_tokens=20, seed=7)
    other = served.predict(prompt="The king", max_new_tokens=20, seed=8)
    assert first["text"] == again["text"]
    assert first["text"] != other["text"]


def test_stream_sends_one_event_per_token_then_usage_and_equals_the_unstreamed_text(served):
    request = {"prompt": "To be or not", "max_new_tokens": 40, "seed": 11, "temperature": 0.9, "top_k": 20}
    whole = served.predict(**request)
    events = [event for _, event in served.stream(**request)]
    *tokens, last = events
    assert all(set(event) == {"text"} for event in tokens)
    assert last["finish_reason"] == "length"
    assert last["usage"] == whole["usage"]
    assert last["model"] == whole["model"]
    # Small groups are allowed, but a 40-token answer arrives in more than a handful of events.
    assert len(events) > 5
    assert "".join(event["text"] for event in events) == whole["text"]


def test_stop_strings_end_the_text_before_them(served):
    free = served.predict(prompt="Stop here", max_new_tokens=30, seed=5, temperature=0)
    stop = free["text"][10:13]
    stopped = served.predict(prompt="Stop here", max_new_tokens=30, seed=5, temperature=0, stop=[stop])
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][: free["text"].index(stop)]
    streamed = served.stream(prompt="Stop here", max_new_tokens=30, seed=5, temperature=0, stop=[stop])
    events = [event for _, event in streamed]
    assert "".join(event["text"] for event in events) == stopped["text"]
    assert events[-1]["finish_reason"] == "stop"


def test_sixteen_concurrent_clients_get_their_own_answers_in_shared_batches(served):
    requests = [
        {"prompt": f"Client number {i} says", "max_new_tokens": 48, "seed": i, "temperature": 0.8} for i in range(16)
    ]
    alone = [served.predict(**request)["text"] for request in requests]
    before = served.metrics()
    start = threading.Barrier(16)

    def client(request):
        start.wait()
        return served.predict(**request)["text"]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(client, requests))
    after = served.metrics()
    assert together == alone
    steps = after.get("gpt_batch_size_count") - before.get("gpt_batch_size_count")
    single = after.get("gpt_batch_size_bucket", le="1.0") - before.get("gpt_batch_size_bucket", le="1.0")
    assert steps - single > 0, "no decode step advanced more than one request"


def test_a_short_request_leaves_the_batch_as_soon_as_it_is_done(served):
    long_running = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(served.stream, prompt="A long story", max_new_tokens=900, seed=1, first=long_running)
        assert long_running.wait(30)
        short = pool.submit(served.stream, prompt="A short one", max_new_tokens=3, seed=2)
        short_events, long_events = short.result(), long.result()
    short_done = short_events[-1][0]
    assert short_events[-1][1]["usage"]["completion_tokens"] == 3
    assert long_events[-1][1]["usage"]["completion_tokens"] == 900
    # The short answer was complete while the long one was still being generated: it did not wait for the
    # batch. (How many tokens the long one had left depends on how busy the machine is, not on the service.)
    tokens_after_short_done = sum(1 for t, _ in long_events if t > short_done)
    assert tokens_after_short_done > 0, tokens_after_short_done


def hold(service, started: threading.Event, done: threading.Event, body: dict) -> bool:
    """Stream `body` until `done` is set, then hang up; say whether it was still running then."""
    with service.client() as client, client.stream("POST", "/predict", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        next(lines)
        started.set()
        for line in lines:
            if done.is_set():
                return True
            if line == "data: [DONE]":
                return False
    return False


# Seeded requests of every sampling setting: the whole vocabulary (top_k 50257 on /predict, and OpenAI's
# default on /v1), wide and narrow top-k, nucleus.
SEEDED = [{"top_k": 50257}, {"top_k": 1000}, {"top_k": 50}, {"top_k": 50257, "top_p": 0.95}]


@pytest.mark.parametrize("flags", [["--dtype", "bf16"], ["--no-pack-weights", "--dtype", "fp32"]],
                         ids=["packed-bf16", "plain-fp32"])  # fmt: skip
def test_seeded_text_does_not_depend_on_what_shares_the_batch(launch, tmp_path, flags):
    # Fresh weights, not sharpened: near-uniform logits over 50,257 tokens, so that a last-bit difference
    # in them would pick another token within a few steps.
    save_checkpoint(tmp_path / "best_model.pt", GPT(GPTConfig.from_preset("tiny", block_size=1024)), step=1)
    service = launch(tmp_path, *flags, "--max-batch-size", "16")
    requests = [{"prompt": f"Seed {i} says", "max_new_tokens": 40, "seed": 1000 + i, **s} for i, s in enumerate(SEEDED)]
    completion = {"model": "gpt", "prompt": "Seed for OpenAI", "max_tokens": 40, "seed": 77}
    alone = [service.predict(**request)["text"] for request in requests]
    with service.client() as client:
        alone.append(client.post("/v1/completions", json=completion).json()["choices"][0]["text"])

    # Fillers of very different lengths run beside the seeded requests until they are all done.
    fillers = [{"prompt": " word" * length, "max_new_tokens": 700, "seed": length} for length in (300, 60, 3)]
    done = threading.Event()
    with ThreadPoolExecutor(len(fillers) + len(requests) + 1) as pool:
        started = [threading.Event() for _ in fillers]
        running = [pool.submit(hold, service, event, done, filler) for event, filler in zip(started, fillers)]
        for event in started:
            event.wait(60)
        batched = []
        for request in requests:  # each joins the running batch after the previous one started
            first = threading.Event()
            batched.append(pool.submit(service.stream, first, **request))
            first.wait(60)

        def complete():
            with service.client() as client:
                return client.post("/v1/completions", json=completion).json()["choices"][0]["text"]

        batched.append(pool.submit(complete))
        texts = [future.result() for future in batched]
        done.set()
        assert all(future.result() for future in running), "a filler ended before the seeded requests did"
    texts = ["".join(event["text"] for _, event in text) if isinstance(text, list) else text for text in texts]
    assert texts == alone
