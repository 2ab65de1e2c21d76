"""The OpenAI-compatible routes, driven by the official openai client."""

from __future__ import annotations

import json

import openai
import pytest
from servicekit import API_KEY


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [model.id for model in models.data] == ["gpt"]
    assert models.data[0].object == "model"


def test_completion_and_its_stream_agree_for_a_seed(client):
    request = dict(
        model="gpt",
        prompt="In a hole in the ground",
        max_tokens=30,
        seed=42,
        temperature=0.8,
        top_p=0.95,
        extra_body={"top_k": 40},
    )
    completion = client.completions.create(**request)
    assert completion.object == "text_completion"
    assert completion.model == "gpt"
    assert completion.id.startswith("cmpl-")
    assert completion.system_fingerprint == "best_model.pt@step-100"
    [choice] = completion.choices
    assert choice.finish_reason == "length" and choice.index == 0 and choice.text
    assert completion.usage.completion_tokens == 30
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 30

    chunks = list(client.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert "".join(texts) == choice.text
    assert len(texts) > 5
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_greedy_completions_are_deterministic_without_a_seed(client):
    first = client.completions.create(model="gpt", prompt="Hello", max_tokens=10, temperature=0)
    second = client.completions.create(model="gpt", prompt="Hello", max_tokens=10, temperature=0, stop=["\u2603"])
    assert first.choices[0].text == second.choices[0].text


def test_n_other_than_one_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="gpt", prompt="Hello", max_tokens=5, n=2)
    error = raised.value.body
    assert error["param"] == "n" and "n:" in error["message"] and "1" in error["message"]


def test_unsupported_options_and_unknown_models_are_refused_in_openai_format(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="gpt", prompt="Hello", max_tokens=5, echo=True)
    assert raised.value.body["param"] == "echo"
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="gpt-4", prompt="Hello", max_tokens=5)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="gpt", prompt="Hello", max_tokens=5, temperature=-1)
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="gpt", prompt="Hello", max_tokens=5000, stream=True)
    assert raised.value.body["param"] == "max_tokens" and raised.value.body["code"] == "limit_exceeded"


def test_wrong_key_is_an_authentication_error(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="gpt", prompt="Hello", max_tokens=5)


def test_completion_stream_is_server_sent_events_ending_in_done(served):
    with (
        served.client() as http,
        http.stream(
            "POST", "/v1/completions", json={"model": "gpt", "prompt": "Hi", "max_tokens": 4, "stream": True}
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    # One chunk per token, or fewer when tokens were grouped; only the last one finishes.
    assert 1 <= len(chunks) <= 4
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_a_single_stop_string_of_any_length_ends_the_text_before_it(client):
    request = dict(model="gpt", prompt="Stop me", max_tokens=40, temperature=0)
    text = client.completions.create(**request).choices[0].text
    marker = text[10:17]
    assert len(marker) == 7
    stopped = client.completions.create(**request, stop=marker).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(marker)]
    assert client.completions.create(**request, stop="###END").choices[0].text == text


def test_models_retrieve_names_the_served_model(client):
    model = client.models.retrieve("gpt")
    assert model.id == "gpt" and model.object == "model" and model.owned_by == "gpt-service"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4")
    assert raised.value.body["code"] == "model_not_found"


def test_an_empty_prompt_starts_a_new_document(client):
    completion = client.completions.create(model="gpt", prompt="", max_tokens=12, seed=3)
    assert completion.usage.prompt_tokens == 1  # end-of-text, which every document follows
    assert completion.usage.completion_tokens == 12 and completion.choices[0].text
