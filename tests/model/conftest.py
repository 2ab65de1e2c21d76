import copy

import pytest
import torch

from model import GPT, GPTConfig, Tokenizer, native
from modelkit import sharpen


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig.from_preset("tiny", block_size=128)


@pytest.fixture
def sharp_model(tiny_config) -> GPT:
    torch.manual_seed(1234)
    return sharpen(GPT(tiny_config)).eval()


@pytest.fixture(scope="module")
def mini() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("mini")).eval()


@pytest.fixture(scope="module")
def draft(mini) -> GPT:
    """A draft model whose distributions are near the target's, as a trained draft's are: its proposals,
    sampled with each request's own random numbers, are mostly kept and sometimes not."""
    model = copy.deepcopy(mini)
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=noise) * 0.002)
    return model


@pytest.fixture
def kernel_path(request):
    """Our kernels forced onto one path for the test (every path the C++ source has: this CPU must run it)."""
    if not native.available():
        pytest.skip(f"the decode kernels are not built here: {native.status()}")
    if request.param not in native.supported_paths():
        pytest.skip(f"path {request.param} needs {native.NEEDS[request.param]}, which this CPU lacks")
    native.use_path(request.param)
    yield request.param
    native.use_path(None)
