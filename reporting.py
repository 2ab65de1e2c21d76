"""Measured figures written into the project's documents, for bench/ (the README's performance section)
and tests/reliability/ (RELIABILITY.md's figures): where they were measured, Markdown tables, and the
generated sections between markers that a script rewrites."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_commit() -> str:
    # A copy of the tree without its .git (bench/gpu.sh on a lent GPU) is told its commit instead.
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def replace_between(text: str, start: str, end: str, body: str) -> str | None:
    """`text` with what lies between the markers `start` and `end` replaced by `body`; None without them.

    Generated sections of the documents (the README's benchmarks, RELIABILITY.md's figures) live
    between such markers, so that a script rewrites them and nothing else."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        return None
    return pattern.sub(lambda _: f"{start}\n{body}{end}", text, count=1)


def markdown_table(rows: list[dict], cell: Callable[[object], str] = str) -> str:
    """Rows of equal keys as a Markdown table, each value written by `cell`."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
