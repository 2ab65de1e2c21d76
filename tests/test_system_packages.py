"""`make test` on a machine without the system programs the tests run stops before any test, with one line
saying what is missing and how to install it (tests/system_packages.py), instead of failing test by test."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import processes
from system_packages import packages_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "system_packages.py"


def bare_path(tmp_path: Path) -> str:
    """A PATH holding make and Python only: no promtool, chromium, docker-compose or apt-get."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "make").symlink_to(shutil.which("make"))
    (folder / "python3").symlink_to(Path(sys.executable).resolve())  # the interpreter itself, not a shim
    return str(folder)


def fresh_shell() -> dict[str, str]:
    """This environment as a user's shell has it, not as the `make test` running these tests passes it on."""
    return {key: value for key, value in os.environ.items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def test_make_test_without_the_programs_stops_before_any_test_naming_them(tmp_path):
    result = processes.run(["make", "--no-print-directory", "test"], cwd=ROOT, timeout=120, capture_output=True,
                           text=True, env={**fresh_shell(), "PATH": bare_path(tmp_path)})  # fmt: skip
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make:")]
    assert len(ours) == 1, result.stderr
    assert ours[0].startswith("missing programs: promtool, prometheus, docker-compose, chromium, haproxy, kubectl; install them first: ")
    assert "apt-get install chromium docker-compose haproxy kubernetes-client prometheus" in ours[0]
    assert "collected" not in result.stdout + result.stderr  # pytest never started


def test_nothing_is_said_or_done_when_every_program_is_there():
    result = processes.run([sys.executable, str(SCRIPT), "sh=dash", "python3=python3"], timeout=60,
                           capture_output=True, text=True)  # fmt: skip
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_ubuntu_names_its_own_packages():
    absent = {"chromium": "chromium", "promtool": "prometheus", "prometheus": "prometheus"}
    assert packages_for(absent, {"debian"}) == ["chromium", "prometheus"]
    assert packages_for(absent, {"ubuntu", "debian"}) == ["chromium-browser", "prometheus"]
