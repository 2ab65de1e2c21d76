"""Linear layers on our own decode kernels (model/native.py): fp32, bf16 or int8 weights, packed once.

The kernels reduce every output element in one fixed order whatever the row count, so a model of
these layers gives each row the same bits alone or in any batch: the engine decodes any number of
rows in one call, with no padding and no row-count groups (generation.row_range). They are made for
the decode step's few rows, where a matrix product is bound by how fast the weights stream in.

Like oneDNN's packed weights (model/packing.py) these are for inference on the CPU only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import native
from model.gpt import GPT
from model.quantize import Int8Linear

BLOCK = 64  # outputs per packed block, as the C++ source's BLOCK
# Inputs per group the kernels read at once: pairs for bf16, quads for int8.
GROUP = {torch.float32: 1, torch.bfloat16: 2, torch.int8: 4}


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) to (blocks, in/group, BLOCK[, group]): each block of BLOCK outputs one stream, k-major,
    zero-padded to whole blocks and groups."""
    group = GROUP[weight.dtype]
    out, inputs = weight.shape
    weight = F.pad(weight, (0, -inputs % group, 0, -out % BLOCK))
    blocks = weight.view(-1, BLOCK, weight.shape[1] // group, group).permute(0, 2, 1, 3)
    return (blocks.squeeze(-1) if group == 1 else blocks).contiguous()


class DecodeLinear(nn.Module):
    """y = x @ W.T + b on the native kernels. From an nn.Linear, W in `weight_dtype` (default: its
    own); from an Int8Linear, its int8 weights and scales, giving exactly its results."""

    def __init__(self, layer: nn.Linear | Int8Linear, weight_dtype: torch.dtype | None = None):
        super().__init__()
        if not native.available():
            raise ValueError(f"the native decode kernels are unavailable: {native.status()}")
        weight = layer.weight.detach()
        if weight.device.type != "cpu":
            raise ValueError(f"the native decode kernels run on the CPU; the weights are on {weight.device}")
        self.out_features = weight.shape[0]
        if isinstance(layer, Int8Linear):
            self.register_buffer("scale", F.pad(layer.scale, (0, -self.out_features % BLOCK)))
            # vpdpbusd takes x + 128: the kernel takes 128 times each output's weight sum back off.
            self.register_buffer("weight_sums", F.pad(weight.sum(dim=1, dtype=torch.int32), (0, -self.out_features % BLOCK)))
        else:
            weight = weight.to(weight_dtype or weight.dtype)
            if weight.dtype not in (torch.float32, torch.bfloat16):
                raise ValueError(f"the native decode kernels take fp32, bf16 or int8 weights, not {weight.dtype}")
            self.scale = self.weight_sums = None
        self.register_buffer("weight", pack_weight(weight))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.ops.gpt_kernels.linear(rows, self.weight, self.bias, self.scale, self.weight_sums,
                                         self.out_features, native.path_id())  # fmt: skip
        return y.view(*x.shape[:-1], self.out_features)


def use_native(model: GPT, weight_dtype: torch.dtype | None = None) -> GPT:
    """Replace the model's linear layers (plain or int8, the LM head included) in place and return it."""
    if not native.available():
        raise ValueError(f"the native decode kernels are unavailable: {native.status()}")
    return model.replace_linears(lambda layer: DecodeLinear(layer, weight_dtype), kinds=(nn.Linear, Int8Linear))
