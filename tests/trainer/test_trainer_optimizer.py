import torch

from model import GPT, GPTConfig
from trainer.optimizer import adamw


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
