"""Trainer fixtures: the tiny-run flags, and helpers to run `trainer` in-process or as a real subprocess
(see tests/trainerkit.py; the session's token cache is `cache_dir` in tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trainerkit
from trainerkit import invoke_fit, tiny_flags


@pytest.fixture
def tiny(cache_dir):
    return lambda out, *extra: tiny_flags(cache_dir, out, *extra)


@pytest.fixture
def fit(cache_dir):
    """Run `trainer fit` in-process on the tiny flags, check its exit code, return click's result."""
    return lambda out, *extra, expect=0: invoke_fit(cache_dir, out, *extra, expect=expect)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir) -> Path:
    """The output folder of one short tiny run, shared by tests that only read its checkpoints."""
    out = tmp_path_factory.mktemp("trained")
    invoke_fit(cache_dir, out, "--steps", "6", "--eval-interval", "3", "--lr", "3e-3", "--warmup-steps", "2")
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def records():
    """The metrics.jsonl records of an output folder."""
    return _records


@pytest.fixture
def spawn():
    """`python -m trainer ARGS` as a real process, its output a line-buffered text pipe."""
    return trainerkit.spawn


@pytest.fixture
def read_until():
    """Read a process's output line by line (blocking, no polling) until a line starts with a prefix."""
    return trainerkit.read_until
