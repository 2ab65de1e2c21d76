"""Prometheus metrics, named after vLLM's under the prefix `gpt_`, shared by every service process.

prometheus_client runs in multiprocess mode: each process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (the CLI sets it before this module is first imported) and `/metrics`
merges them. Gauges say how processes combine: running and waiting requests add up over live
workers; the served checkpoint is the one most recently loaded. The `process_*` figures of every
service process, and what the status board counts in shared memory, are read at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from model.speculation import MAX_DRAFT
from service import metricstore

# Before the first metric opens its file.
metricstore.install()

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
    "Time between consecutive tokens of one request (the tokens one step gives a request share its time evenly).",
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
SPECULATION_PROPOSED = Counter(
    "gpt_speculation_proposed_tokens",
    "Draft tokens checked by the served model, by source (lookup, draft).",
    ["source"],
)
SPECULATION_ACCEPTED = Counter(
    "gpt_speculation_accepted_tokens",
    "Draft tokens kept (each the very token plain decoding gives there), by source (lookup, draft).",
    ["source"],
)
TOKENS_PER_PASS = Histogram(
    "gpt_speculation_tokens_per_pass",
    "Tokens one decode pass of the served model gave one request: 1, plus its kept draft tokens.",
    buckets=tuple(range(1, MAX_DRAFT + 2)),
)
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
RELOAD_RESULTS = ("success", "failure", "timeout")
RELOADS = Counter("gpt_model_reloads", "Checkpoint loads, by result (success, failure, timeout).", ["result"])
DRAFT_RELOADS = Counter(
    "gpt_draft_reloads",
    "Draft checkpoint loads (--draft-checkpoint), by result (success, failure, timeout).",
    ["result"],
)
MODEL_DTYPE = Gauge(
    "gpt_model_dtype",
    "1 for the precision the served weights compute in (--dtype auto measures the candidates), 0 for the others.",
    ["dtype"],
    multiprocess_mode="livemax",
)
HTTP_TIMEOUTS = Counter(
    "gpt_http_request_timeouts", "Connections closed because a request did not arrive in full within --request-timeout."
)
RESTARTS = Counter("gpt_process_restarts", "Service processes that died and were replaced, by role.", ["role"])


def render(board) -> tuple[bytes, str]:
    """The text exposition of every service process: merged multiprocess files plus live figures."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(_LiveCollector(board))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def count_storage_failures(board) -> None:
    """Count on the status board when this process cannot write its metrics files (see metricstore)."""

    def count() -> None:
        with board.metrics_failures.get_lock():
            board.metrics_failures.value += 1

    metricstore.on_failure(count)


class _LiveCollector(Collector):
    """Figures read at scrape time: `process_*` of every service process (one series per process,
    labelled by pid and role, under the standard names), each worker's heartbeat and the status board's
    shared counters."""

    def __init__(self, board):
        self.board = board

    def collect(self) -> Iterator:
        labels = ["pid", "role"]
        cpu = CounterMetricFamily("process_cpu_seconds", "User and system CPU time spent in seconds.", labels=labels)
        rss = GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", labels=labels)
        vms = GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", labels=labels)
        start = GaugeMetricFamily(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", labels=labels
        )
        threads = GaugeMetricFamily("process_threads", "Number of OS threads in the process.", labels=labels)
        fds = GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", labels=labels)
        max_fds = GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", labels=labels)
        roles = self.board.roles()
        try:
            root = psutil.Process(self.board.main_pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            try:
                with process.oneshot():
                    if process.status() == psutil.STATUS_ZOMBIE:
                        continue
                    role = "main" if process.pid == self.board.main_pid else roles.get(process.pid, "helper")
                    values = [str(process.pid), role]
                    times, memory = process.cpu_times(), process.memory_info()
                    cpu.add_metric(values, times.user + times.system)
                    rss.add_metric(values, memory.rss)
                    vms.add_metric(values, memory.vms)
                    start.add_metric(values, process.create_time())
                    threads.add_metric(values, process.num_threads())
                    fds.add_metric(values, process.num_fds())
                    soft = process.rlimit(psutil.RLIMIT_NOFILE)[0]
                    if soft != psutil.RLIM_INFINITY:
                        max_fds.add_metric(values, soft)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        yield from (cpu, rss, vms, start, threads, fds, max_fds)
        heartbeat = GaugeMetricFamily(
            "gpt_worker_heartbeat_timestamp_seconds",
            "When each inference worker last posted a heartbeat (it does, busy or idle, twice a second).",
            labels=["worker"],
        )
        responsive = GaugeMetricFamily(
            "gpt_worker_responsive",
            "1 for an inference worker that answers heartbeats (or is starting), 0 for one that has not for "
            "seconds (stopped, frozen): it cannot take requests.",
            labels=["worker"],
        )
        for worker in self.board.workers():
            if worker.pid:
                heartbeat.add_metric([str(worker.worker_id)], worker.heartbeat_at)
                responsive.add_metric([str(worker.worker_id)], 0 if worker.unresponsive else 1)
        yield from (heartbeat, responsive)
        yield CounterMetricFamily(
            "gpt_metrics_storage_failures",
            "Service processes that could not write their metrics files (a full disk under --metrics-dir); "
            "their figures are missing from this page.",
            value=self.board.metrics_failures.get_obj().value,
        )


def forget_process(pid: int) -> None:
    """Drop the live gauges of a process that died, so they stop counting."""
    mark_process_dead(pid)
