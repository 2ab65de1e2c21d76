import pytest
import torch

from model import autocast_dtype, resolve_device


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
