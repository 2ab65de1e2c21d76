"""A copy of the fixture results (a real CPU run, a stale extra file and a CPU dry run of gpu.sh) per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "results"


@pytest.fixture
def results(tmp_path) -> Path:
    copy = tmp_path / "bench" / "results"
    shutil.copytree(FIXTURES, copy)
    return copy
