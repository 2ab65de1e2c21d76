import pytest
import torch

from model import GPT, Engine, GPTConfig, SamplingParams, autocast_dtype, native, resolve_device
from model.decode_linear import DecodeLinear
from model.device import DTYPES, measure_dtype
from model.packing import PackedLinear


def test_auto_picks_the_best_available_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


def test_explicit_devices_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") == torch.float32
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert autocast_dtype(cpu, "auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        autocast_dtype(cpu, "fp8")


def test_measure_dtype_times_each_candidate_and_serves_the_fastest():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    choice = measure_dtype(model, batch_size=4, context=48)
    assert set(choice.seconds_per_step) == {"fp32", "bf16"}
    assert all(0 < seconds < float("inf") for seconds in choice.seconds_per_step.values())
    fastest = min(choice.seconds_per_step, key=choice.seconds_per_step.get)
    assert choice.dtype == DTYPES[fastest]
    assert choice.model.lm_head.weight.dtype == choice.dtype
    cpu_layout = DecodeLinear if native.available() else PackedLinear
    assert isinstance(choice.model.lm_head, cpu_layout), "timed and served in the service's CPU layout"
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32, "left as it was"
    engine = Engine(choice.model, max_batch_size=2)
    assert len(engine.generate_tokens([[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0))[0]) == 3


def test_measure_dtype_with_one_candidate_and_bad_arguments():
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    only = measure_dtype(model, batch_size=1, context=8, candidates=("fp32",), prepare=lambda m, dtype: m.to(dtype))
    assert only.dtype == torch.float32 and list(only.seconds_per_step) == ["fp32"]
    with pytest.raises(ValueError, match="unknown dtype"):
        measure_dtype(model, batch_size=1, context=8, candidates=("fp8",))
    with pytest.raises(ValueError, match="context 65 must be between 1 and the model's 64"):
        measure_dtype(model, batch_size=1, context=65)
