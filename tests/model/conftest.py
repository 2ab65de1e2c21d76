import pytest
import torch

from model import GPT, GPTConfig, Tokenizer


def sharpen(model: GPT, factor: float = 8.0) -> GPT:
    """Scale a fresh model's weights so its logits are far apart.

    A freshly initialised GPT predicts a near-uniform distribution whose top logits differ only in
    the last bits, where batched and unbatched matrix products legitimately disagree. Tests that
    compare token sequences need real margins between candidates, as a trained model has.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(factor)
    return model


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
