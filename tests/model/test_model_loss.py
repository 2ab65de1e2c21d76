"""The cross-entropy computed a block of rows at a time equals the one computed from the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from model.loss import linear_cross_entropy
from tolerance import cross_entropy_bounds

N, C, V = 300, 16, 1000


def reference(x, weight, targets, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=-1)


def loss_and_grads(loss_fn, x, weight, targets, bf16: bool):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(x, weight, targets)
    (loss * 0.5).backward()  # a scaled loss, as gradient accumulation makes it
    return loss.detach(), x.grad, weight.grad


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows_per_block", [7, N], ids=["blocks", "one-block"])
def test_loss_and_gradients_match_the_materialised_logits(bf16, rows_per_block):
    torch.manual_seed(0)
    x, weight = torch.randn(N, C), torch.randn(V, C) * 0.5
    targets = torch.randint(0, V, (N,))
    targets[::7] = -1  # ignored positions count for nothing
    fused = lambda x, w, t: linear_cross_entropy(x, w, t, chunk_bytes=rows_per_block * V * (2 if bf16 else 4))
    exact = loss_and_grads(lambda x, w, t: reference(x, w, t, False), x, weight, targets, False)
    got = loss_and_grads(fused, x, weight, targets, bf16)
    scales = (1.0, 0.5, 0.5)  # the gradients are of half the loss
    for ours, truth, bound, scale in zip(got, exact, cross_entropy_bounds(x, weight, targets, bf16), scales):
        assert ours.dtype == truth.dtype == torch.float32
        assert (ours - truth).abs().max() <= scale * bound


def test_without_gradients_only_the_loss_is_computed():
    torch.manual_seed(0)
    x, weight = torch.randn(N, C), (torch.randn(V, C) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, chunk_bytes=7 * V * 4)
    assert loss.grad_fn is None
    expected = reference(x, weight.detach(), targets, False)
    assert abs(loss.item() - expected.item()) <= cross_entropy_bounds(x, weight.detach(), targets)[0]


def test_a_loss_beyond_float32_probabilities_is_still_exact():
    torch.manual_seed(0)
    x, weight = torch.randn(4, C) * 100, torch.randn(V, C) * 10  # target probabilities far below 1e-45
    targets = torch.randint(0, V, (4,))
    expected = reference(x, weight, targets, False)
    assert expected.item() > 1000
    loss = linear_cross_entropy(x, weight, targets)
    assert abs(loss.item() - expected.item()) <= cross_entropy_bounds(x, weight, targets)[0]


def test_gpt_trains_the_same_through_the_blocked_loss():
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_multiple=64)  # padded rows must get no gradient
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, 24))
    targets = torch.randint(0, config.vocab_size, (2, 24))
    hidden = []
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: hidden.append(out) or out.retain_grad())
    _, loss = model(idx, targets)
    loss.backward()
    blocked = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    expected.backward()
    h, weight = hidden[1].detach().flatten(0, 1), model.lm_head.weight.detach()[: config.vocab_size]
    loss_bound, hidden_bound, weight_bound = cross_entropy_bounds(h, weight, targets.flatten())
    assert abs(loss.item() - expected.item()) <= loss_bound
    # Below the head both runs do the same operations on the hidden states' gradients, which differ
    # within hidden_bound: to first order that relative error reaches every parameter's gradient at its
    # own magnitude, plus the head's weight gradient's own bound (the tied embedding's share).
    relative = hidden_bound / hidden[1].grad.abs().max().item()
    for name, p in model.named_parameters():
        bound = p.grad.abs().max().item() * relative + (weight_bound if "wte" in name else 0)
        assert (blocked[name] - p.grad).abs().max().item() <= bound, name
    assert not blocked["transformer.wte.weight"][config.vocab_size :].any()


def test_a_quantized_head_still_gives_the_loss():
    from model.quantize import quantize

    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    model = quantize(GPT(config).eval(), "int8")  # its head holds no plain weight matrix
    idx = torch.randint(0, config.vocab_size, (2, 24))
    logits, _ = model(idx)
    _, loss = model(idx, idx)
    # The same function of the same logits: exact.
    assert loss.item() == F.cross_entropy(logits.flatten(0, 1), idx.flatten()).item()
