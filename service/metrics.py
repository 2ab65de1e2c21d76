"""Prometheus metrics, named after vLLM's under the prefix `gpt_`, shared by every service process.

prometheus_client runs in multiprocess mode: each process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (the CLI sets it before this module is first imported) and `/metrics`
merges them. Gauges say how processes combine: running and waiting requests add up over live
workers; the served checkpoint is the one most recently loaded.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.proctree import ProcessTreeCollector

# A tiny model answers in a few milliseconds and a large one on a CPU takes seconds: buckets from 1 ms.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    20,
    40,
    80,
)
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUESTS = Counter(
    "gpt_requests",
    "Generation requests answered, by route, HTTP status and finish reason.",
    ["endpoint", "status", "finish_reason"],
)
E2E_LATENCY = Histogram(
    "gpt_e2e_request_latency_seconds",
    "Time from receiving a generation request to sending its last byte.",
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gpt_time_to_first_token_seconds",
    "Time from receiving a request to its first generated token.",
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "gpt_inter_token_latency_seconds",
    "Time between consecutive tokens of one request.",
    buckets=TOKEN_LATENCY_BUCKETS,
)
QUEUE_TIME = Histogram(
    "gpt_request_queue_time_seconds",
    "Time from receiving a request to the decode step that starts it.",
    buckets=LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("gpt_prompt_tokens", "Prompt tokens prefilled.")
GENERATION_TOKENS = Counter("gpt_generation_tokens", "Tokens generated.")
BATCH_SIZE = Histogram("gpt_batch_size", "Requests advanced by one decode step.", buckets=BATCH_BUCKETS)
RUNNING = Gauge("gpt_num_requests_running", "Requests in a running batch.", multiprocess_mode="livesum")
WAITING = Gauge(
    "gpt_num_requests_waiting",
    "Requests accepted by a worker and waiting for a batch row.",
    multiprocess_mode="livesum",
)
MODEL_STEP = Gauge(
    "gpt_model_step", "Training step of the checkpoint being served.", multiprocess_mode="livemostrecent"
)
MODEL_VAL_LOSS = Gauge(
    "gpt_model_val_loss",
    "Validation loss of the checkpoint being served (NaN when it has none).",
    multiprocess_mode="livemostrecent",
)
RELOADS = Counter("gpt_model_reloads", "Checkpoint loads, by result.", ["result"])


def render(root_pid: int, roles: dict[int, str]) -> tuple[bytes, str]:
    """The text exposition of every service process: merged multiprocess files plus /proc figures."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(ProcessTreeCollector(root_pid, roles))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_process(pid: int) -> None:
    """Drop the live gauges of a process that died, so they stop counting."""
    mark_process_dead(pid)
