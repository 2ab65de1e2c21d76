"""Property-based fuzzing of the generation routes from the service's own OpenAPI schema.

Whatever the body (see hostile.py), the live service answers within the client's timeout, never with
a 5xx; every 4xx is a JSON error naming the problem; every 200 is a complete answer or stream; and
afterwards the service is still ready, idle, and logged no exception.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hostile import bodies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliabilitykit import SCALE, wait_idle

# Fields drawn in a narrower range half of the time, so that more valid bodies get past the service's
# limits (which its schema does not state) and the model check to the worker.
SHORT = st.integers(1, 32) | st.integers(min_value=1)
ROUTES = {
    "/predict": {"max_new_tokens": SHORT},
    "/v1/completions": {"max_tokens": SHORT, "model": st.just("gpt") | st.text()},
}
FINISH_REASONS = {"stop", "length"}


def check_error(response: httpx.Response) -> None:
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)


def check_answer(route: str, response: httpx.Response) -> None:
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and not any("error" in chunk for chunk in chunks), chunks[-1:]
        # /predict ends with an event carrying the finish reason; completions with the last choice's.
        last = chunks[-1] if route == "/predict" else [c for c in chunks if c["choices"]][-1]["choices"][0]
        assert last["finish_reason"] in FINISH_REASONS
        return
    body = response.json()
    finish_reason = body["finish_reason"] if route == "/predict" else body["choices"][0]["finish_reason"]
    assert finish_reason in FINISH_REASONS
    assert body["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("route", list(ROUTES))
def test_any_body_gets_a_clean_answer_and_the_service_stays_ready(reliable, route, figures):
    schema = httpx.get(reliable.url + "/openapi.json").json()["paths"][route]["post"]["requestBody"]
    schema = schema["content"]["application/json"]["schema"]
    log_start = len(reliable.log())
    statuses = Counter()
    headers = {**reliable.headers, "content-type": "application/json"}

    with httpx.Client(base_url=reliable.url, headers=headers, timeout=60.0) as client:

        @settings(
            max_examples=SCALE.fuzz_cases,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(body=bodies(schema, ROUTES[route]))
        def answers_cleanly(body: bytes):
            # A hang fails here too: the client gives up after its timeout and raises.
            response = client.post(route, content=body)
            statuses[response.status_code] += 1
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                check_error(response)
            else:
                assert response.status_code == 200
                check_answer(route, response)

        answers_cleanly()

    assert statuses[200] > 0, f"no body reached the model: {statuses}"
    assert reliable.health().status_code == 200
    wait_idle(reliable)
    new_log = reliable.log()[log_start:]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-3000:]
    figures.update(cases=sum(statuses.values()), statuses=dict(sorted(statuses.items())))
