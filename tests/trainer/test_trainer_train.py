"""The pieces nanoGPT keeps beside its loop: the learning-rate schedule and AdamW's parameter groups."""

import math

import pytest
import torch

from model import GPT, GPTConfig
from trainer.train import adamw, learning_rate

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


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(GPTConfig.from_preset("tiny"))
    optimizer = adamw(model, lr=1e-3, weight_decay=0.1, device=torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    named = dict(model.named_parameters())
    assert {id(p) for p in decay["params"] + no_decay["params"]} == {id(p) for p in named.values()}
    assert any(p is named["transformer.wte.weight"] for p in decay["params"])
    assert any(p is named["transformer.ln_f.weight"] for p in no_decay["params"])
    assert decay["betas"] == (0.9, 0.95)
