"""Helpers every test folder shares for models: weights scaled so that logits are far apart."""

from __future__ import annotations

import torch
import torch.nn as nn


def sharpen(model: nn.Module, factor: float = 8.0) -> nn.Module:
    """Scale a fresh model's weight matrices (ours or transformers') so its logits are far apart.

    A freshly initialised GPT predicts a near-uniform distribution whose top logits differ only in
    the last bits, where batched and unbatched matrix products legitimately disagree. Tests that
    compare token sequences need real margins between candidates, as a trained model has.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(factor)
    return model
