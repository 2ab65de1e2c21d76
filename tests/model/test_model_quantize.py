import copy

import pytest
import torch

from model import Engine, GPT, GPTConfig, SamplingParams
from model.quantize import Int4Linear, Int8Linear, quantize


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(5, 7, 256).to(torch.bfloat16)
    q = Int8Linear(linear, torch.bfloat16)
    assert q.weight.dtype == torch.int8
    assert q(x).dtype == torch.bfloat16 and q(x).shape == (5, 7, 96)
    assert _relative_error(q(x), linear(x)) < 0.01


def test_int4_linear_pads_odd_output_sizes_and_tracks_the_float_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 50).to(torch.bfloat16)
    x = torch.randn(3, 64).to(torch.bfloat16)
    q = Int4Linear(linear, torch.bfloat16)
    assert q(x).shape == (3, 50)
    assert _relative_error(q(x), linear(x)) < 0.15
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear(torch.nn.Linear(48, 16), torch.bfloat16)


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.02), ("int4", 0.2)])
def test_quantized_models_keep_their_logits(mode, tolerance):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_multiple=64)).eval().to(torch.bfloat16)
    quantized = quantize(copy.deepcopy(model), mode)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        expected, _ = model(idx)
        logits, _ = quantized(idx)
    assert logits.shape == expected.shape
    assert _relative_error(logits, expected) < tolerance
    tokens = Engine(quantized, max_batch_size=2).generate_tokens([[1, 2, 3], [4]], SamplingParams(max_new_tokens=5))
    assert all(len(t) == 5 and max(t) < 50257 for t in tokens)


def test_none_is_a_no_op_and_unknown_modes_are_refused():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert quantize(model, "none") is model
    with pytest.raises(ValueError, match="unknown quantization 'int2'"):
        quantize(model, "int2")
