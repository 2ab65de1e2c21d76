"""AdamW as GPT-2 is trained: decay on matrices and embeddings, none on biases and LayerNorm gains."""

from __future__ import annotations

import torch


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass instead of a Python loop of small ops.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)
