"""The tests' own process hygiene: a child that outlives its test fails the run and is killed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import processes
import psutil

TESTS = Path(__file__).resolve().parent

LEAKY_TEST = textwrap.dedent(
    """
    import os
    import processes

    def test_leaves_a_child_running():
        child = processes.spawn(["sleep", "600"])
        with open(os.environ["PID_FILE"], "w") as f:
            f.write(str(child.pid))
    """
)


def test_a_process_left_running_fails_the_session_and_is_killed(tmp_path):
    (tmp_path / "test_leak.py").write_text(LEAKY_TEST)
    result = processes.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "processes", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'base'}", "--rootdir", str(tmp_path), str(tmp_path / "test_leak.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS), "PID_FILE": str(tmp_path / "pid")}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 passed" in result.stdout and "processes left running by the tests" in result.stdout
    pid = int((tmp_path / "pid").read_text())
    assert f"{pid} sleep 600" in result.stdout
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_spawned_child_dies_with_the_process_that_started_it(tmp_path):
    script = "import processes, sys; print(processes.spawn(['sleep', '600']).pid, flush=True); sys.stdin.read()"
    parent = processes.spawn(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip
    grandchild = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    grandchild.wait(timeout=30)  # raises psutil.TimeoutExpired if it lives on
