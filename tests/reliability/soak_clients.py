"""The soak's clients: a seeded mix of streamed and whole answers on both routes, lengths and sampling
parameters, with a tenth of the streams abandoned after their first events."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = "the king said to his daughter that every river runs into the sea and yet the sea is never full".split()
DISCONNECT_SHARE = 0.1


@dataclass(frozen=True)
class Plan:
    route: str
    body: dict
    stream: bool
    leave_after: int | None  # events after which the client disconnects, for abandoned streams


def plans(count: int, rng: random.Random) -> list[Plan]:
    streams = [rng.random() < 0.5 for _ in range(count)]
    streamed = [i for i, stream in enumerate(streams) if stream]
    abandoned = set(rng.sample(streamed, max(1, round(DISCONNECT_SHARE * len(streamed)))))
    result = []
    for i, stream in enumerate(streams):
        route = rng.choice(["/predict", "/v1/completions"])
        leave_after = rng.randint(1, 3) if i in abandoned else None
        # An abandoned stream asks for many tokens (and a short prompt, to fit the context) and has no
        # stop string (the served model never ends a text), so that it is surely left mid-way.
        length = 1000 if leave_after else rng.choice([1, 4, 16, 64, 128])
        body = {
            "prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 20 if leave_after else 200))),
            "temperature": rng.choice([0.0, 0.7, 1.0, 1.5]),
            "top_k": rng.choice([1, 10, 50, 50257]),
            "top_p": rng.choice([1.0, 0.9, 0.5]),
            "seed": rng.choice([None, rng.randrange(2**31)]),
            "stream": stream,
        }
        if rng.random() < 0.2 and not leave_after:
            body["stop"] = [rng.choice(WORDS)]
        if route == "/predict":
            body["max_new_tokens"] = length
        else:
            body.update(model="gpt", max_tokens=length, ignore_eos=rng.random() < 0.5)
        result.append(Plan(route, body, stream, leave_after))
    return result


@dataclass
class Results:
    outcomes: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)

    @property
    def unexpected(self) -> int:
        return len(self.errors)


async def _run_one(client: httpx.AsyncClient, plan: Plan, results: Results) -> None:
    async with client.stream("POST", plan.route, json=plan.body) as response:
        results.request_ids.append(response.headers.get("x-request-id", "?"))
        if response.status_code != 200:
            results.errors.append(f"{plan.route} {response.status_code}: {(await response.aread())[:300]!r}")
            return
        if not plan.stream:
            body = json.loads(await response.aread())
            finish = body["finish_reason"] if plan.route == "/predict" else body["choices"][0]["finish_reason"]
            if finish not in ("stop", "length"):
                results.errors.append(f"{plan.route}: finish reason {finish!r}")
                return
            results.outcomes["whole"] += 1
            return
        events = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: ") :])
            if plan.leave_after and len(events) == plan.leave_after and events[-1] != "[DONE]":
                results.outcomes["abandoned"] += 1
                return  # leaving the block closes the connection mid-stream
        if events[-1:] != ["[DONE]"] or any('"error"' in event for event in events):
            results.errors.append(f"{plan.route}: stream ended with {events[-2:]}")
            return
        results.outcomes["streamed"] += 1


async def _drive(url: str, headers: dict, work: list[Plan], concurrency: int, results: Results) -> None:
    queue = list(reversed(work))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0, limits=limits) as client:

        async def worker():
            while queue:
                plan = queue.pop()
                try:
                    await _run_one(client, plan, results)
                except httpx.HTTPError as e:
                    results.errors.append(f"{plan.route}: {type(e).__name__}: {e}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def run(url: str, headers: dict, work: list[Plan], concurrency: int) -> Results:
    """Send every planned request, `concurrency` at a time; return what came back."""
    results = Results()
    asyncio.run(_drive(url, headers, work, concurrency, results))
    return results
