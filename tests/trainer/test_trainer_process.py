"""The trainer as a real process: stopped by signals, scraped over HTTP, drawing a progress bar on a terminal."""

import fcntl
import os
import pty
import signal
import struct
import sys
import termios

import httpx
import processes
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model import read_checkpoint

TOKENS_PER_STEP = 4 * 32


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_writes_last_and_exits_zero(tiny, spawn, read_until, records, tmp_path, sig):
    process = spawn(["fit", *tiny(tmp_path, "--steps", "100000", "--checkpoint-interval", "100000")])
    seen = []
    read_until(process, "step 2 |", seen)
    process.send_signal(sig)
    rest, _ = process.communicate(timeout=120)
    output = "".join(seen) + rest
    assert process.returncode == 0, output
    assert f"{sig.name} received: finishing this step" in output
    last = read_checkpoint(tmp_path / "last.pt")
    assert 2 <= last["step"] < 100000 and "optimizer" in last
    assert last["step"] == records(tmp_path)[-1]["step"]
    assert f"Stopped at step {last['step']}" in output
    assert not (tmp_path / "final_model.pt").exists()


def test_prometheus_endpoint_reports_training(tiny, spawn, read_until, records, tmp_path):
    process = spawn(["fit", *tiny(tmp_path, "--steps", "100000", "--eval-interval", "2", "--metrics-port", "0")])
    seen = []
    try:
        port = int(read_until(process, "Prometheus metrics on port", seen).split()[-1])
        read_until(process, "Saved best model", seen)
        read_until(process, "step 3 |", seen)
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    assert process.returncode == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    logged = {r["step"]: r for r in records(tmp_path)}
    step = int(value("gpt_train_step"))
    assert step >= 3
    assert value("gpt_train_loss") in {r["loss"] for r in logged.values()}
    assert value("gpt_train_learning_rate") in {r["lr"] for r in logged.values()}
    assert value("gpt_val_loss") in {r["val_loss"] for r in logged.values() if "val_loss" in r}
    assert value("gpt_train_tokens_per_second") > 0
    assert value("gpt_train_tokens_total") in {step * TOKENS_PER_STEP, (step + 1) * TOKENS_PER_STEP}
    assert value("gpt_train_checkpoints_total", kind="best") >= 1
    assert value("gpt_train_checkpoints_total", kind="final") == 0


def test_progress_bar_on_a_terminal(tiny, tmp_path):
    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, where a bar has no room; give it a real terminal's size.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = processes.spawn([sys.executable, "-m", "trainer", "fit", *tiny(tmp_path, "--steps", "3")],
                              stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0
    text = output.decode(errors="replace")
    assert "3/3" in text and ("step/s" in text or "s/step" in text), text
    assert "step 3 | lr" in text
