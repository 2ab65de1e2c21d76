"""Model FLOPs utilisation: the FLOPs a step needs against what the device can do.

GPU peaks are the vendors' dense bf16 figures. A CPU has no such figure that means much, so its peak
is measured: the rate of a large matrix product in the compute dtype.
"""

from __future__ import annotations

import time

import torch

from model import GPTConfig

# Dense bf16 tensor-core peaks, FLOP/s.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def flops_per_token(config: GPTConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight (position embeddings excluded, as
    nanoGPT counts) plus attention's 12·L·T·C."""
    return 6 * n_params + 12 * config.n_layer * seq_len * config.n_embd


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak for `dtype`, or None where it is unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAKS.items() if key in name), None)
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return None


def measure_matmul_flops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.25) -> float:
    """FLOP/s of repeated size×size matrix products on the CPU."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed
