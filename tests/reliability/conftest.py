"""The reliability suite: the service and the trainer under hostile input, faults and load.

Every test runs at two sizes: small in `make test`, full in `make soak` (RELIABILITY_SOAK=1), which
also writes the figures the tests record to RELIABILITY_REPORT (JSON), prints them, and rewrites the
figures section of RELIABILITY_DOC (RELIABILITY.md) from them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from reliabilitykit import FIGURES_END, FIGURES_START, SCALE, render
from servicekit import API_KEY, Service, publish

from reporting import git_commit, machine, replace_between

# What the tests measured, by test: written out at the end of the session.
FIGURES: dict[str, dict] = {}


@pytest.fixture
def figures(request) -> dict:
    """A dict in which the test leaves the figures it measured, for the soak report."""
    return FIGURES.setdefault(request.node.name, {})


STARTED = time.monotonic()


def pytest_sessionfinish(session):
    report_path = os.environ.get("RELIABILITY_REPORT")
    if not (report_path and FIGURES):
        return
    host = machine()
    run = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": host["cpu"],
        "cores": host["cores"],
        "minutes": round((time.monotonic() - STARTED) / 60, 1),
        "passed": session.testsfailed == 0,
    }
    report = {"run": run, "scale": asdict(SCALE), "figures": FIGURES}
    Path(report_path).write_text(json.dumps(report, indent=2) + "\n")
    doc = os.environ.get("RELIABILITY_DOC")
    if doc:
        text = replace_between(Path(doc).read_text(), FIGURES_START, FIGURES_END, render(report))
        assert text is not None, f"{doc} lacks the markers {FIGURES_START} and {FIGURES_END}"
        Path(doc).write_text(text)


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("RELIABILITY_REPORT") and FIGURES:
        terminalreporter.section("reliability figures")
        terminalreporter.write_line(json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="session")
def reliable(launch_for_session, tmp_path_factory) -> Service:
    """The service most reliability tests share: an API key, a batch of 16 with room to queue the soak's
    32 clients, and limits the fuzzer can reach."""
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=1)
    limits = [
        "--max-batch-size", "16", "--max-queued-requests", "64", "--max-new-tokens", "1000",
        "--max-prompt-tokens", "256", "--max-body-bytes", "65536",
    ]  # fmt: skip
    return launch_for_session(checkpoint_dir, *limits, api_key=API_KEY)
