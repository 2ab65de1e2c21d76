import math

import pytest

from trainer.schedule import learning_rate

LR, MIN_LR, WARMUP, DECAY = 6e-4, 6e-5, 10, 110


def lr_at(step):
    return learning_rate(step, LR, MIN_LR, WARMUP, DECAY)


def test_warmup_rises_linearly_to_the_peak():
    assert [lr_at(s) for s in range(WARMUP)] == pytest.approx([LR * (s + 1) / WARMUP for s in range(WARMUP)])
    assert lr_at(WARMUP - 1) == pytest.approx(LR)


def test_cosine_decays_from_peak_to_floor():
    assert lr_at(WARMUP) == pytest.approx(LR)
    assert lr_at((WARMUP + DECAY) // 2) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(DECAY) == pytest.approx(MIN_LR)
    assert lr_at(DECAY + 1000) == pytest.approx(MIN_LR)
    decay = [lr_at(s) for s in range(WARMUP, DECAY + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_no_warmup_starts_at_peak():
    assert learning_rate(0, LR, MIN_LR, 0, 100) == pytest.approx(LR)
    assert math.isclose(learning_rate(50, LR, 0.0, 0, 100), LR / 2)
