"""bench/gpu.py: its race to a training loss on a fake clock (when it stops and what it reports), and
every section run for real on the CPU at tiny shapes, so that a lent GPU's one call finds them working."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import processes
import pytest

from bench.gpu import CURVE_POINTS, race, race_summary


def fake_run(losses, seconds_per_step=1.0, first_step=10.0):
    """A step function giving `losses` in turn and a clock on which the first step (compilation)
    takes `first_step` seconds and every other step `seconds_per_step`."""
    losses = iter(losses)
    now = itertools.count()
    ticks = {"t": 0.0}

    def clock():
        return ticks["t"]

    def step():
        ticks["t"] += first_step if next(now) == 0 else seconds_per_step
        return next(losses)

    return step, clock


def test_race_stops_at_the_first_loss_below_the_target():
    step, clock = fake_run([5.0, 1.0, 0.2, 0.09, 0.05])
    curve = race(step, target_loss=0.1, time_limit=100, clock=clock)
    assert [loss for _, loss in curve] == [5.0, 1.0, 0.2, 0.09]
    summary = race_summary(curve, 0.1, tokens_per_step=1000, skip_steps=1)
    assert summary["reached"] is True
    assert summary["seconds_to_target"] == pytest.approx(13.0)
    assert summary["seconds_to_target_after_first_step"] == pytest.approx(3.0)
    assert summary["first_step_seconds"] == pytest.approx(10.0)
    # The compiling first step stays out of the rate: 3 steps of 1000 tokens in 3 seconds.
    assert summary["tokens_per_s"] == pytest.approx(1000.0)
    assert summary["measured_steps"] == 3


def test_race_gives_up_at_the_time_limit_and_says_so():
    step, clock = fake_run(itertools.repeat(2.0))
    curve = race(step, target_loss=0.1, time_limit=20, clock=clock)
    assert curve[-1][0] == pytest.approx(20.0)
    summary = race_summary(curve, 0.1, tokens_per_step=10, skip_steps=5)
    assert summary["reached"] is False
    assert summary["seconds_to_target"] is None
    assert summary["lowest_loss"] == 2.0
    assert summary["tokens_per_s"] == pytest.approx(10.0)


def test_short_runs_measure_their_second_half_and_long_curves_are_thinned():
    step, clock = fake_run([3.0, 0.05])
    summary = race_summary(race(step, 0.1, 100, clock), 0.1, tokens_per_step=100, skip_steps=10)
    assert summary["measured_steps"] == 1
    assert summary["tokens_per_s"] == pytest.approx(100.0)

    step, clock = fake_run(itertools.repeat(1.0))
    curve = race(step, 0.1, time_limit=5000, clock=clock)
    points = race_summary(curve, 0.1, 1, 10)["curve"]
    assert len(points) <= CURVE_POINTS + 1
    assert points[0]["elapsed"] == curve[0][0] and points[-1]["elapsed"] == curve[-1][0]


SECTIONS = {
    "train": ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--dtype", "fp32", "--no-compile",
              "--lr", "1e-2", "--warmup-steps", "2", "--decay-steps", "100", "--target-loss", "9.5",
              "--time-limit", "30", "--skip-steps", "1", "--data", "builtin:pydoc"],
    "decode": ["--preset", "tiny", "--batches", "1", "4", "--new-tokens", "8"],
    "serve": ["--preset", "tiny", "--dtype", "fp32", "--concurrency", "1", "2", "--requests", "2", "--output-len", "8"],
}  # fmt: skip


def test_every_section_runs_on_the_cpu_and_writes_its_result(tmp_path):
    root = Path(__file__).resolve().parents[2]
    for section, flags in SECTIONS.items():
        command = [sys.executable, "-m", "bench.gpu", section, "--device", "cpu", "--results-dir", str(tmp_path), *flags]
        done = processes.run(command, cwd=root, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr

    train = json.loads((tmp_path / "gpu_train.json").read_text())
    assert train["reached"] and train["final_loss"] < 9.5 and train["tokens_per_s"] > 0
    assert train["run"]["device"] == "cpu" and train["run"]["attention_kernel"] != "unknown"
    decode = json.loads((tmp_path / "gpu_decode.json").read_text())
    assert [(row["dtype"], row["batch"]) for row in decode["rows"]] == [("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    assert all(row["tokens_per_s"] > 0 for row in decode["rows"])
    serve = json.loads((tmp_path / "gpu_serve.json").read_text())
    assert [level["concurrency"] for level in serve["sweep"]] == [1, 2]
    assert all(level["output_tok_per_s"] > 0 for level in serve["sweep"])
    summary = processes.run([sys.executable, "-m", "bench.gpu", "summary", "--results-dir", str(tmp_path)],
                             cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert summary.returncode == 0 and "tokens/s" in summary.stdout, summary.stdout + summary.stderr
