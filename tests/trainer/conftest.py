"""Trainer fixtures: a shared token cache, the tiny-run flags, and helpers to run `trainer` in-process
or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainer.cli import main


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the session, so builtin:pydoc is tokenized once."""
    return tmp_path_factory.mktemp("token-cache")


def tiny_flags(cache_dir: Path, out: Path, *extra: str) -> list[str]:
    """`trainer fit` flags for a tiny, deterministic CPU run writing to `out`."""
    return [
        "--data", "builtin:pydoc", "--cache-dir", str(cache_dir), "--out", str(out),
        "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--eval-iters", "2",
        "--device", "cpu", "--dtype", "fp32", "--no-compile", "--log-interval", "1", *extra,
    ]


def invoke_fit(cache_dir: Path, out: Path, *extra: str, expect: int = 0):
    result = CliRunner().invoke(main, ["fit", *tiny_flags(cache_dir, out, *extra)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


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


def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def _read_until(process: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"process ended before printing {prefix!r}:\n{''.join(seen)}")


@pytest.fixture
def records():
    """The metrics.jsonl records of an output folder."""
    return _records


@pytest.fixture
def spawn():
    """`python -m trainer ARGS` as a real process, its output a line-buffered text pipe."""
    return _spawn


@pytest.fixture
def read_until():
    """Read a process's output line by line (blocking, no polling) until a line starts with a prefix."""
    return _read_until
