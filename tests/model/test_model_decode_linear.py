"""Our decode kernels (model.native, model.decode_linear): values, paths, fallback, and the engine on them.

Batch invariance at every row count is tests/model/test_model_invariance.py's; here each path's values
are checked against float64, int8 against Int8Linear bit for bit, and the machinery around the ops.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from model import GPT, Engine, GPTConfig, SamplingParams, native
from model.decode_linear import DecodeLinear, use_native
from model.device import cpu_layout, serving_layout
from model.packing import PackedLinear
from model.quantize import Int8Linear, quantize
from modelkit import sharpen

pytestmark = pytest.mark.skipif(not native.available(), reason=f"decode kernels not built: {native.status()}")

# The gpt2 layers' widths, with output counts that end in a partial block of 64.
SHAPES = [(768, 2304), (3072, 768), (768, 1041), (100, 70)]
FP32_UNIT = torch.finfo(torch.float32).eps / 2
# vdpbf16ps reads x as bf16 hi + lo halves: lo is within 2^-9 |x| and is itself rounded to 8 bits.
HI_LO_UNIT = 2.0**-17


@pytest.fixture(params=native.PATHS)
def path(request):
    if request.param not in native.supported_paths():
        pytest.skip(f"path {request.param} needs {native.NEEDS[request.param]}, which this CPU lacks")
    native.use_path(request.param)
    yield request.param
    native.use_path(None)


def tolerance(x: torch.Tensor, w: torch.Tensor, representation: float) -> torch.Tensor:
    """Each output's error bound: a chain of K fp32 multiply-adds errs by at most K units of rounding
    times sum |x_k w_k| (the standard bound for recursive summation), plus what reading x in another
    representation costs, relative to the same sum."""
    magnitude = x.double().abs() @ w.double().abs().T
    return (x.shape[1] * FP32_UNIT + representation) * magnitude + 1e-30


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_products_are_within_the_rounding_bound_of_float64(path, weight_dtype):
    torch.manual_seed(0)
    for inputs, outputs in SHAPES:
        linear = torch.nn.Linear(inputs, outputs)
        layer = DecodeLinear(linear, weight_dtype)
        x = torch.randn(5, inputs)
        w = linear.weight.detach().to(weight_dtype)  # the weights as the kernel holds them
        exact = x.double() @ w.double().T + linear.bias.detach().double()
        dot = weight_dtype == torch.bfloat16 and path == "avx512_dot"
        error = (layer(x).double() - exact).abs()
        assert (error <= tolerance(x, w, HI_LO_UNIT if dot else 0.0) + FP32_UNIT * exact.abs()).all(), (inputs, outputs)


def test_int8_weights_give_int8linears_bits(path):
    """Activations quantized per row as Int8Linear does, integer products exact: the same bits, in fp32 and bf16."""
    torch.manual_seed(0)
    for inputs, outputs in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            reference = Int8Linear(torch.nn.Linear(inputs, outputs).to(dtype), dtype)
            x = torch.randn(7, inputs).to(dtype)
            assert torch.equal(DecodeLinear(reference)(x), reference(x)), (inputs, outputs, dtype)


def test_the_avx2_and_avx512_paths_give_the_same_bits():
    """Both are one fused multiply-add chain per output, so the instruction set does not show in the numbers."""
    if not {"avx2", "avx512"} <= set(native.supported_paths()):
        pytest.skip("this CPU lacks AVX2 or AVX-512")
    torch.manual_seed(0)
    for weight_dtype in (torch.float32, torch.bfloat16):
        layer = DecodeLinear(torch.nn.Linear(3072, 1041), weight_dtype)
        x = torch.randn(6, 3072)
        outputs = []
        for name in ("avx2", "avx512"):
            native.use_path(name)
            outputs.append(layer(x))
        native.use_path(None)
        assert torch.equal(*outputs), weight_dtype


def test_the_path_comes_from_gpt_kernel_isa_or_use_path(monkeypatch):
    layer = DecodeLinear(torch.nn.Linear(64, 64))
    x = torch.randn(2, 64)
    monkeypatch.setenv(native.ENV, "scalar")
    native.use_path(None)
    try:
        assert native.path_name() == "scalar"
        assert torch.ops.gpt_kernels.linear(x, layer.weight, layer.bias, None, None, 64, 0).equal(layer(x))
        native.use_path(native.supported_paths()[-1])  # use_path outranks the variable
        assert native.path_name() == native.supported_paths()[-1]
        monkeypatch.setenv(native.ENV, "sse9")
        native.use_path(None)
        with pytest.raises(ValueError, match="unknown kernel path 'sse9' \\(GPT_KERNEL_ISA\\): use one of scalar, avx2"):
            layer(x)
        with pytest.raises(ValueError, match="unknown kernel path 'neon'"):
            native.use_path("neon")
    finally:
        monkeypatch.delenv(native.ENV)
        native.use_path(None)
    assert native.path_name() == native.supported_paths()[-1]


@pytest.fixture
def fallback(monkeypatch, request):
    """The extension as if absent (request.param: how), then back as it was."""
    if request.param == "unbuilt":
        monkeypatch.setattr(native, "library_path", lambda: native.SOURCE.parent / "missing.so")
    else:
        monkeypatch.setenv(native.ENV, "none")
    native._load.cache_clear()
    yield
    monkeypatch.undo()
    native._load.cache_clear()
    native.use_path(None)


@pytest.mark.parametrize("fallback", ["unbuilt", "switched off"], indirect=True)
def test_without_the_extension_the_cpu_runs_on_onednn_and_says_why(fallback, caplog):
    with caplog.at_level(logging.INFO, logger="model.native"):
        assert not native.available()
        native.status()
    assert native.status().startswith("fallback (")
    assert "not built" in native.status() or "GPT_KERNEL_ISA=none" in native.status()
    assert [r.getMessage() for r in caplog.records] == [f"decode kernels: fallback to torch's, {native.status()[10:-1]}"]
    torch.manual_seed(0)
    model = serving_layout(GPT(GPTConfig.from_preset("tiny")), torch.float32)
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(cpu_layout(quantize(GPT(GPTConfig.from_preset("tiny")), "int8")).lm_head, Int8Linear)
    with pytest.raises(ValueError, match="the native decode kernels are unavailable: fallback"):
        DecodeLinear(torch.nn.Linear(4, 4))


def test_with_the_extension_the_cpu_serves_on_it():
    assert native.status() == f"native ({native.supported_paths()[-1]})"
    model = serving_layout(GPT(GPTConfig.from_preset("tiny")), torch.bfloat16)
    assert isinstance(model.lm_head, DecodeLinear) and model.lm_head.weight.dtype == torch.bfloat16
    int8 = cpu_layout(quantize(GPT(GPTConfig.from_preset("tiny")), "int8"))
    assert isinstance(int8.lm_head, DecodeLinear) and int8.lm_head.weight.dtype == torch.int8


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_greedy_tokens_match_todays_layouts(dtype):
    """Sharpened weights (tokens decided by real margins): our kernels decode the same greedy tokens
    as torch's plain fp32 / bf16 layers and as Int8Linear."""
    torch.manual_seed(0)
    base = sharpen(GPT(GPTConfig.from_preset("mini")).eval())
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    today = copy.deepcopy(base).to(torch_dtype)
    if dtype == "int8":
        today = quantize(today, "int8")
    ours = use_native(copy.deepcopy(today))
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_at_eot=False)
    prompts = [[464, 2068, 7586, 21831], [40, 716, 257]]
    tokens = [Engine(m, max_batch_size=2, max_seq_len=64).generate_tokens(prompts, params) for m in (today, ours)]
    assert tokens[0] == tokens[1]


def test_bf16_weights_in_an_fp32_model_follow_fp32s_greedy_tokens_longer_than_a_bf16_model():
    """bf16 weights with the residual stream, norms, attention and accumulation in fp32 (llama.cpp's
    bf16): rounding the weights still changes the function, but on each prompt its greedy tokens
    agree with fp32's for at least as long as an all-bf16 model's, and in all for longer."""
    torch.manual_seed(0)
    base = sharpen(GPT(GPTConfig.from_preset("mini")).eval())
    params = SamplingParams(max_new_tokens=48, temperature=0.0, stop_at_eot=False)
    prompts = [[464, 2068, 7586, 21831], [40, 716, 257], [1, 2, 3, 4, 5]]

    def agreement(model: GPT) -> list[int]:
        tokens = Engine(model, max_batch_size=3, max_seq_len=64).generate_tokens(prompts, params)
        return [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                for ours, theirs in zip(tokens, reference)]  # fmt: skip

    reference = Engine(copy.deepcopy(base), max_batch_size=3, max_seq_len=64).generate_tokens(prompts, params)
    mixed = agreement(use_native(copy.deepcopy(base), torch.bfloat16))
    bf16 = agreement(use_native(copy.deepcopy(base).bfloat16()))
    assert all(m >= b for m, b in zip(mixed, bf16)) and sum(mixed) > sum(bf16), (mixed, bf16)


def test_torch_compile_traces_the_custom_op():
    layer = DecodeLinear(torch.nn.Linear(64, 96))
    x = torch.randn(3, 64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), layer(x))


def test_the_stream_read_reads_every_element(path):
    buffer = torch.arange(100_003, dtype=torch.float32) % 7
    assert torch.ops.gpt_kernels.stream_read(buffer, native.path_id()).item() == pytest.approx(buffer.double().sum().item())
