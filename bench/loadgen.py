"""A load generator for the service's streaming completions, reporting what `vllm bench serve` reports.

    python -m bench.loadgen --url http://127.0.0.1:8000 [--concurrency 1 4 16 32] [--requests 64]
                            [--input-len 32] [--output-len 128] [--api-key KEY]

Every request streams /v1/completions with a prompt of exactly --input-len tokens and asks for
exactly --output-len tokens (ignore_eos), at most --concurrency requests in flight. Per level it
reports request and output-token throughput and the p50/p95/p99 of time to first token (TTFT),
inter-token latency (ITL: the gap between consecutive streamed chunks) and end-to-end latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import print_table

# " hello" is one GPT-2 token, so n of them make a prompt of exactly n tokens.
PROMPT_TOKEN = " hello"


@contextlib.contextmanager
def running_service(checkpoint_dir: Path, flags: list[str], start_timeout: float = 120.0) -> Iterator[str]:
    """`service serve` over `checkpoint_dir` with `flags` on a free local port; yields its URL once it is
    ready, and stops it (its workers with it) on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--checkpoint-dir", str(checkpoint_dir), "--log-level", "warning", *flags,
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not become ready (exit code {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


HAPROXY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_config(servers: list[str], port: int, metrics_port: int) -> str:
    """The compose file's HAProxy configuration for this machine: listening on local ports, and the replicas
    named by address (HOST:PORT) where Docker's DNS fills its server template in compose."""
    text = HAPROXY_CONFIG.read_text()
    text = text.replace("bind :8000", f"bind 127.0.0.1:{port}").replace("bind :8405", f"bind 127.0.0.1:{metrics_port}")
    lines = "".join(f"    server api{i} {server}\n" for i, server in enumerate(servers, 1))
    text, replaced = re.subn(r"^ *server-template api \d+ api:8000\n", lines, text, flags=re.M)
    if replaced != 1:
        raise ValueError(f"no server-template for api in {HAPROXY_CONFIG}")
    return text


@contextlib.contextmanager
def running_balancer(urls: list[str], folder: Path, start_timeout: float = 60.0) -> Iterator[str]:
    """Debian's haproxy with `haproxy_config` in front of the services at `urls`; yields its URL once it
    sends to all of them, and stops it on exit."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise RuntimeError("haproxy not found: apt-get install -y haproxy")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    config = folder / "haproxy.cfg"
    config.write_text(haproxy_config([url.removeprefix("http://") for url in urls], *ports))
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, start_new_session=True)
    metrics = f"http://127.0.0.1:{ports[1]}/metrics"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            with contextlib.suppress(httpx.TransportError):
                text = httpx.get(metrics, timeout=5).text
                if f'haproxy_backend_active_servers{{proxy="api"}} {len(urls)}\n' in text:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not send to the services (exit code {process.poll()})")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{ports[0]}"
    finally:
        process.terminate()
        process.wait(timeout=60)


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """The rate this client received its tokens at, from sending the request to the last token.

        Not counted from the first event: the service may group tokens, so the first event can carry
        several.
        """
        return self.output_tokens / self.e2e


def completion_payload(input_len: int, output_len: int, seed: int, model: str = "gpt") -> dict:
    return {
        "model": model,
        "prompt": PROMPT_TOKEN * input_len,
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": 1.0,
        "top_k": 50,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_completion(client: httpx.AsyncClient, payload: dict) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    async with client.stream("POST", "/v1/completions", json=payload) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return result
            now = time.perf_counter()
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
    result.e2e = time.perf_counter() - start
    result.ok = result.output_tokens == payload["max_tokens"]
    if not result.ok:
        result.error = f"{result.output_tokens} tokens instead of {payload['max_tokens']}"
    return result


async def run_level(
    url: str, concurrency: int, requests: int, input_len: int, output_len: int, api_key: str | None = None
) -> tuple[dict, list[RequestResult]]:
    """Send `requests` streamed completions, `concurrency` at a time; return the summary and each result."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600.0, limits=limits) as client:

        async def one(seed: int) -> RequestResult:
            async with semaphore:
                return await stream_completion(client, completion_payload(input_len, output_len, seed))

        start = time.perf_counter()
        results = await asyncio.gather(*(one(seed) for seed in range(requests)))
        duration = time.perf_counter() - start
    return summarize(concurrency, results, duration), results


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    if len(done) != len(results):
        errors = {r.error for r in results if not r.ok}
        raise RuntimeError(f"{len(results) - len(done)} of {len(results)} requests failed: {sorted(errors)[:3]}")
    ttft = [r.ttft for r in done]
    itl = [gap for r in done for gap in r.itls]
    e2e = [r.e2e for r in done]
    row = {
        "concurrency": concurrency,
        "requests": len(done),
        "duration_s": duration,
        "req_per_s": len(done) / duration,
        "output_tok_per_s": sum(r.output_tokens for r in done) / duration,
    }
    for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p, value in percentiles(values).items():
            row[f"{name}_{p}_ms"] = value * 1000
    return row


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    rows = [
        asyncio.run(run_level(args.url, c, max(args.requests, c), args.input_len, args.output_len, args.api_key))[0]
        for c in args.concurrency
    ]
    print_table(f"{args.url}: {args.input_len} prompt tokens, {args.output_len} output tokens", rows)


if __name__ == "__main__":
    main()
