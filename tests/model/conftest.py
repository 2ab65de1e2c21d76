import pytest
import torch

from model import GPT, GPTConfig, Tokenizer
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
