"""Linear layers with their weights kept in oneDNN's blocked layout, for inference on CPUs.

A decode step multiplies a few rows (one per request) by every weight matrix. Given an ordinary
row-major weight, the CPU kernels re-block it on every call, and at 2 to 16 rows that costs as
much as the arithmetic; reordering each weight once at load time removes it. On the 2-core
development machine (bench/results/decode.json) batch-8 fp32 decoding of the gpt2 shape ran 1.6×
faster, bf16 decoding 1.3× faster at batch 1 and 8, fp32 single-stream decoding 10% slower.

The packed weights are opaque oneDNN tensors: a packed model is for inference only, stays on the
CPU in its dtype, and cannot be copied or saved (pack the copy you serve, keep the original).
"""

from __future__ import annotations

from bisect import bisect_left

import torch
import torch.nn as nn

from model.gpt import GPT

# The row count oneDNN chooses its weight layout for; any number of rows can then be multiplied.
ROWS_HINT = 8
# oneDNN compiles, and keeps, a kernel for every row count it is given: about half a megabyte each,
# which prompts of every length would grow without bound (an engine fed random batches gained 800 MB;
# the soak test caught a worker growing). Rows go in as one of these counts, zero-padded up to the
# next (less than half as much work again), in pieces of at most the last.
ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def available() -> bool:
    return torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        self.out_features = weight.shape[0]
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._product(rows) for rows in x.reshape(-1, x.shape[-1]).split(ROW_BUCKETS[-1])]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        return y.view(*x.shape[:-1], self.out_features)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        n = len(rows)
        bucket = ROW_BUCKETS[bisect_left(ROW_BUCKETS, n)]
        if bucket > n:
            rows = torch.cat([rows, rows.new_zeros(bucket - n, rows.shape[1])])
        return torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")[:n]


def pack(model: GPT) -> GPT:
    """Replace the model's linear layers (LM head included) in place and return it."""
    if not available():
        raise ValueError("this torch build has no oneDNN (mkldnn) kernels to pack weights for")
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError(f"packed weights are for CPU kernels; the model is on {param.device}")
    return model.replace_linears(PackedLinear)
