"""The reliability suite: the service and the trainer under hostile input, faults and load.

Every test runs at two sizes: small in `make test`, full in `make soak` (RELIABILITY_SOAK=1), which
also writes the figures the tests record to RELIABILITY_REPORT (JSON) and prints them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
from reliabilitykit import SCALE
from servicekit import API_KEY, Service, publish


# What the tests measured, by test: written out at the end of the session.
FIGURES: dict[str, dict] = {}


@pytest.fixture
def figures(request) -> dict:
    """A dict in which the test leaves the figures it measured, for the soak report."""
    return FIGURES.setdefault(request.node.name, {})


def pytest_sessionfinish(session):
    report = os.environ.get("RELIABILITY_REPORT")
    if report and FIGURES:
        Path(report).write_text(json.dumps({"scale": asdict(SCALE), "figures": FIGURES}, indent=2) + "\n")


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("RELIABILITY_REPORT") and FIGURES:
        terminalreporter.section("reliability figures")
        terminalreporter.write_line(json.dumps(FIGURES, indent=2))


@pytest.fixture(scope="session")
def reliable(launch, tmp_path_factory) -> Service:
    """The service most reliability tests share: an API key, a batch of 16 with room to queue the soak's
    32 clients, and limits the fuzzer can reach."""
    checkpoint_dir = tmp_path_factory.mktemp("checkpoints")
    publish(checkpoint_dir, step=1)
    limits = [
        "--max-batch-size", "16", "--max-queued-requests", "64", "--max-new-tokens", "1000",
        "--max-prompt-tokens", "256", "--max-body-bytes", "65536",
    ]  # fmt: skip
    return launch(checkpoint_dir, *limits, api_key=API_KEY)
