"""Bad input, limits and the API key: every refusal is a 4xx with a JSON body that names the problem."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

# (body, status, the field the error must name, a word its message must contain)
BAD_PREDICT_BODIES = [
    ({}, 422, "prompt", "required"),
    ({"prompt": ""}, 422, "prompt", "at least 1"),
    ({"prompt": 42}, 422, "prompt", "string"),
    ({"prompt": "hi", "max_new_tokens": "5"}, 422, "max_new_tokens", "integer"),
    ({"prompt": "hi", "max_new_tokens": 2.5}, 422, "max_new_tokens", "integer"),
    ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens", "greater than or equal to 1"),
    ({"prompt": "hi", "max_new_tokens": 1001}, 422, "max_new_tokens", "at most 1000"),
    ({"prompt": "hi", "temperature": -0.5}, 422, "temperature", "greater than or equal to 0"),
    ({"prompt": "hi", "temperature": "hot"}, 422, "temperature", "number"),
    ({"prompt": "hi", "top_k": 0}, 422, "top_k", "greater than or equal to 1"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p", "greater than 0"),
    ({"prompt": "hi", "top_p": 1.5}, 422, "top_p", "less than or equal to 1"),
    ({"prompt": "hi", "seed": "abc"}, 422, "seed", "integer"),
    ({"prompt": "hi", "seed": 2**70}, 422, "seed", "less than or equal"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", "at most 4"),
    ({"prompt": "hi", "stop": "a"}, 422, "stop", "array"),
    ({"prompt": "hi", "stream": "yes"}, 422, "stream", "boolean"),
    ({"prompt": "hi", "max_tokens": 5}, 422, "max_tokens", "not permitted"),
]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_every_bad_field_is_named_in_a_4xx_streamed_or_not(served, stream):
    with served.client() as client:
        for body, status, field, words in BAD_PREDICT_BODIES:
            if stream and "stream" not in body:
                body = {**body, "stream": True}
            error = error_of(client.post("/predict", json=body), status)
            assert error["param"] == field, (body, error)
            assert field in error["message"] and words in error["message"], (body, error)


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_malformed_bodies_are_refused_with_json(served, raw):
    with served.client() as client:
        response = client.post("/predict", content=raw, headers={"content-type": "application/json"})
    error = error_of(response, 422)
    assert error["message"]


def test_a_prompt_over_the_token_limit_is_refused_before_streaming(served):
    prompt = " word" * 301
    with served.client() as client:
        for stream in (False, True):
            error = error_of(client.post("/predict", json={"prompt": prompt, "stream": stream}), 422)
            assert error["param"] == "prompt" and "301 tokens exceed the limit of 300" in error["message"]


def test_a_prompt_that_does_not_fit_the_context_is_refused_before_streaming(served):
    # 200 prompt tokens + 900 new ones exceed the tiny model's 1024-token context.
    prompt = " word" * 200
    with served.client() as client:
        for stream in (False, True):
            response = client.post("/predict", json={"prompt": prompt, "max_new_tokens": 900, "stream": stream})
            error = error_of(response, 422)
            assert error["code"] == "context_length_exceeded"
            assert "200 tokens plus 900 new tokens exceed the model's context of 1024" in error["message"]


def test_a_body_over_the_size_limit_gets_413(served):
    with served.client() as client:
        response = client.post("/predict", json={"prompt": "x" * 70_000})
        error = error_of(response, 413)
        assert "65536 bytes" in error["message"]
        # Chunked, without a Content-Length to reject it by.
        response = client.post("/predict", content=iter([b'{"prompt": "', b"y" * 70_000, b'"}']))
        error_of(response, 413)


@pytest.mark.parametrize("path", ["/predict", "/v1/completions", "/v1/models"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key", "Basic dGVzdA==", "Bearer"])
def test_generation_routes_need_the_api_key(served, path, authorization):
    headers = {"authorization": authorization} if authorization else {}
    method = "GET" if path == "/v1/models" else "POST"
    response = httpx.request(method, served.url + path, headers=headers, json={"prompt": "hi", "model": "gpt"})
    error = error_of(response, 401)
    assert error["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
    assert served.api_key not in response.text


def test_probes_and_scrapes_need_no_key(served):
    assert httpx.get(served.url + "/health").status_code == 200
    assert httpx.get(served.url + "/live").status_code == 200
    assert httpx.get(served.url + "/metrics").status_code == 200


def test_unusual_text_is_served_or_refused_cleanly(served):
    body = {
        "prompt": "nul \u0000, emoji \U0001f389, accents e\u0301, CJK \u4e2d\u6587",
        "max_new_tokens": 12,
        "seed": 4,
    }
    assert served.predict(**body)["usage"]["completion_tokens"] == 12
    with served.client() as client:
        # A lone surrogate is valid JSON syntax but no text: refused as a bad body, not a server error.
        response = client.post(
            "/predict", content=b'{"prompt": "x \\ud800 y"}', headers={"content-type": "application/json"}
        )
        assert error_of(response, 422)["code"] == "invalid_json"
        response = client.post(
            "/predict",
            content=b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            headers={"content-type": "application/json"},
        )
        assert error_of(response, 422)["code"] == "invalid_json"


def test_openapi_describes_the_request_bodies(served):
    paths = httpx.get(served.url + "/openapi.json").json()["paths"]
    predict = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert predict["required"] == ["prompt"]
    assert predict["properties"]["top_p"] == {
        "default": 1.0,
        "exclusiveMinimum": 0.0,
        "maximum": 1.0,
        "title": "Top P",
        "type": "number",
    }
    completions = paths["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "prompt", "max_tokens", "top_k", "stream_options"} <= set(completions["properties"])
    assert "$ref" not in str(completions)


def raw_request(served, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are (no client library would send them) and read the status and JSON body."""
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(data)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_unknown_routes_wrong_methods_and_malformed_http_answer_in_openai_shape(served):
    error = error_of(httpx.get(served.url + "/no/such/route"), 404)
    assert error["code"] == "not_found" and "/no/such/route" in error["message"]
    error = error_of(httpx.delete(served.url + "/predict"), 405)
    assert error["code"] == "method_not_allowed"
    status, body = raw_request(served, b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400 and body["error"]["code"] == "bad_request" and body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"]
)
def test_bodies_that_are_not_json_are_refused_before_generating(served, content_type):
    # What a cross-site form can send without the browser asking the service first.
    headers = {"authorization": f"Bearer {served.api_key}"} | ({"content-type": content_type} if content_type else {})
    generated = served.metrics().get("gpt_generation_tokens_total")
    response = httpx.post(served.url + "/predict", content=b'{"prompt": "hi"}', headers=headers)
    error = error_of(response, 415)
    assert "application/json" in error["message"]
    assert served.metrics().get("gpt_generation_tokens_total") == generated


def test_a_trailing_slash_is_not_redirected_to_the_clients_host(served):
    headers = {**served.headers, "host": "attacker.example"}
    response = httpx.post(served.url + "/predict/", json={"prompt": "hi"}, headers=headers)
    error_of(response, 404)
    assert "location" not in response.headers


def test_request_headers_are_bounded_in_number_and_size(served):
    many = b"".join(b"x-filler-%d: 1\r\n" % i for i in range(150))
    status, body = raw_request(served, b"GET /health HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert status == 431 and body["error"]["code"] == "too_many_headers"
    status, body = raw_request(served, b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert status == 431 and body["error"]["code"] == "headers_too_large"
    assert httpx.get(served.url + "/health", headers={f"x-{i}": "1" for i in range(50)}).status_code == 200


def test_a_prompt_too_long_to_fit_is_refused_by_its_size_before_tokenizing(served):
    # 50,000 digits: under the 64 KiB body limit, over what 300 tokens of at most 128 characters can hold.
    with served.client() as client:
        error = error_of(client.post("/predict", json={"prompt": "7" * 50_000}), 422)
    assert error["param"] == "prompt" and "50000 characters cannot fit the limit of 300 tokens" in error["message"]
