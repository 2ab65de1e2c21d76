"""bench/gpu.py's race to a training loss, on a fake clock: when it stops and what it reports."""

from __future__ import annotations

import itertools

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
