"""Helpers of the trainer tests: the tiny-run flags, and `trainer` in-process or as a real process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import processes
from click.testing import CliRunner

from trainer.cli import main


def tiny_flags(cache_dir: Path, out: Path, *extra: str) -> list[str]:
    """`trainer fit` flags for a tiny, deterministic CPU run writing to `out`."""
    return [
        "--data", "builtin:pydoc", "--cache-dir", str(cache_dir), "--out", str(out),
        "--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--eval-iters", "2",
        "--device", "cpu", "--dtype", "fp32", "--no-compile", "--log-interval", "1", *extra,
    ]  # fmt: skip


def invoke_fit(cache_dir: Path, out: Path, *extra: str, expect: int = 0):
    """Run `trainer fit` in-process on the tiny flags, check its exit code, return click's result."""
    result = CliRunner().invoke(main, ["fit", *tiny_flags(cache_dir, out, *extra)])
    assert result.exit_code == expect, result.output + repr(result.exception)
    return result


def spawn(args: list[str], **popen) -> subprocess.Popen:
    """`python -m trainer ARGS` as a real process, its output a line-buffered text pipe."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return processes.spawn(
        [sys.executable, "-m", "trainer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **popen,
    )


def read_until(process: subprocess.Popen, prefix: str, seen: list[str]) -> str:
    """Read a process's output line by line (blocking, no polling) until a line starts with `prefix`."""
    for line in process.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"process ended before printing {prefix!r}:\n{''.join(seen)}")


def resumed_step(output: str) -> int:
    """The step a run's output says it resumed at (its "resuming at step N," line)."""
    found = re.search(r"resuming at step (\d+),", output)
    assert found, output[-4000:]
    return int(found.group(1))
