"""Helpers of the reliability tests: how big each run is, waiting for the workers to fall idle, and the
figures section of RELIABILITY.md written from a soak report."""

from __future__ import annotations

import os
from dataclasses import dataclass

from servicekit import Scrape, Service, wait_for

from reporting import markdown_table


@dataclass(frozen=True)
class Scale:
    fuzz_cases: int  # per endpoint
    soak_requests: int
    soak_concurrency: int
    trainer_kills: int
    worker_kills: int
    slowloris: int  # connections that never finish their headers
    slow_bodies: int  # 1 MiB bodies whose last bytes never come
    training_log_lines: int  # short records in a metrics.jsonl that pages poll
    soak: bool


SOAK = os.environ.get("RELIABILITY_SOAK") == "1"
SCALE = (
    Scale(1000, 2000, 32, 20, 5, 2000, 300, 8_200_000, True)
    if SOAK
    else Scale(40, 120, 16, 3, 1, 200, 30, 2_000_000, False)
)


def wait_idle(service: Service, timeout: float = 30.0) -> Scrape:
    """The first scrape in which no request runs or waits in any worker."""

    def idle():
        scrape = service.metrics()
        running = scrape.get("gpt_num_requests_running") + scrape.get("gpt_num_requests_waiting")
        return running == 0 and scrape

    return wait_for(idle, timeout, message="every request to leave the workers")


# RELIABILITY.md's figures, rewritten by `make soak` from the report it writes.
FIGURES_START, FIGURES_END = "<!-- soak:start -->", "<!-- soak:end -->"


def _counts(counts: dict) -> str:
    return ", ".join(f"{key} ×{value}" for key, value in counts.items())


def _describe(test: str, f: dict) -> str:
    """One test's figures as a sentence; a test without its own wording gets its figures listed."""
    if test.startswith("test_any_body"):
        return f"{f['cases']} bodies; answers by status: {_counts(f['statuses'])}"
    if test.startswith("test_soak"):
        processes = f["processes"].values()
        drifts = [p["rss_drift_percent"] for p in processes]
        threads = ", ".join(f"{p['role']} {p['threads'][0]}→{p['threads'][1]}" for p in processes)
        fds = ", ".join(f"{p['role']} {p['fds'][0]}→{p['fds'][1]}" for p in processes)
        per_stream = f["tokens_generated_for_nobody"] / max(f["abandoned_streams_cancelled"], 1)
        return (
            f"{f['requests']} requests at concurrency {f['concurrency']} (seed {f['seed']}) after "
            f"{len(f['warmup_rss_mib_by_round']) - 1} warm-up rounds: {_counts(f['outcomes'])}; "
            f"{f['unexpected_errors']} unexpected errors; resident memory after warm-up {min(drifts):+.1f}% to "
            f"{max(drifts):+.1f}% over {len(drifts)} processes; threads (before→after) {threads}; open files {fds}; "
            f"{f['abandoned_streams_cancelled']} abandoned streams cancelled, "
            f"{f['tokens_generated_for_nobody']} tokens generated after their clients left ({per_stream:.1f} per stream)"
        )
    if test.startswith("test_a_client_that_leaves"):
        return f"{f['tokens_generated']} tokens generated, {f['tokens_taken']} taken before the client left"
    if test.startswith("test_sigkill"):
        return (
            f"{f['kills_survived']} SIGKILLs survived (seed {f['seed']}; {_counts(f['kills_by_moment'])}), "
            f"then resumed to step {f['final_step']} with every step logged once"
        )
    if test.startswith("test_dead_workers"):
        return (
            f"{f['worker_deaths']} worker deaths ({', '.join(f['signals'])}), each replaced; requests arriving "
            f"while no worker served, by status: {_counts(f['requests_arriving_during_outage'])}"
        )
    return "; ".join(f"{key} {value}" for key, value in f.items())


def render(report: dict) -> str:
    """RELIABILITY.md's figures section for a soak report."""
    run = report["run"]
    lines = [
        f"Last `make soak`: {run['date']}, commit `{run['commit']}`, {run['cpu']} ({run['cores']} cores), "
        f"{run['minutes']:.1f} minutes.",
        "",
        markdown_table([{"test": f"`{name}`", "figures": _describe(name, f)} for name, f in report["figures"].items()]),
    ]
    return "\n".join(lines) + "\n"
