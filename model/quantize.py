"""Quantized linear layers for inference on the CPU: fewer bytes read per generated token.

Decoding one token reads every weight once, so on a CPU its speed is set by how fast the matrix
kernels stream weights, not by arithmetic. int8 keeps each weight in 8 bits (a scale per output
channel) and quantizes each row of activations to 8 bits with a scale of its own, then multiplies in
integers, which is exact: a row's result never depends on the rows beside it, as in full precision. On
the 2-core development machine the gpt2 shape's matrix products ran about twice as fast as bf16's.
Group-wise int4 halves the weight bytes again, at a measurable cost in quality (see the README's
benchmark table); its activations stay in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.gpt import GPT

MODES = ("none", "int8", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    """y = (qx @ q.T) * scale_x * scale + bias, q int8 per output channel, qx int8 per row of x."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        # Stored (out, in) and used transposed: the column-major layout the integer product reads fastest.
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        product = torch._int_mm(torch.round(rows / row_scale).to(torch.int8), self.weight.t())
        y = product * (row_scale * self.scale)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(*x.shape[:-1], -1)


class Int4Linear(nn.Module):
    """Weights in groups of INT4_GROUP inputs, each group w = (q - 8) * scale + zero with q in 0..15."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        if k % INT4_GROUP:
            raise ValueError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {k}")
        # The packing kernel wants output rows in multiples of 16 (the LM head has 50257).
        self.out_features = n
        w = torch.cat([w, w.new_zeros(-n % 16, k)])
        n = w.shape[0]
        groups = w.view(n, k // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        zero = low + 8 * scale
        self.register_buffer("scales_and_zeros", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]), self.weight, INT4_GROUP, self.scales_and_zeros
        )
        y = y[:, : self.out_features].view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize(model: GPT, mode: str) -> GPT:
    """Replace the model's linear layers (LM head included) in place; `none` leaves it untouched.

    The tied embedding stays in full precision for the input lookup. The result is for inference
    only and runs on the CPU.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return model
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weight-only quantization uses CPU kernels; keep quantize=none on GPUs")
    kind = Int8Linear if mode == "int8" else Int4Linear
    dtype = next(model.parameters()).dtype
    return model.replace_linears(lambda linear: kind(linear, dtype))
