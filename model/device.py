"""Choosing where and in which precision to run: CUDA, then MPS, then CPU, unless told otherwise.

For serving, `measure_dtype` picks the precision by timing it: whether bf16 decodes faster than
fp32 depends on the CPU (AVX512-BF16, AMX or neither), the weight layout and the batch, and a CPU
flag says too little (on the development machines packed bf16 decoded 1.5x faster than fp32 on an
AMD EPYC and slower on an Intel Xeon).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model import native, packing
from model.decode_linear import use_native
from model.generation import decode_groups, row_range
from model.gpt import GPT, KVCache
from model.quantize import Int8Linear

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(name: str | None = "auto") -> torch.device:
    """`auto` (or None) picks CUDA, then Apple's MPS, then the CPU; anything else must be usable here."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products beat fp32 on `device`.

    On a CPU this is a guess from one flag, AMX, and CPUs disagree: with AVX512-BF16 alone one machine
    multiplied bf16 at half the fp32 rate (164 vs 326 GFLOP/s), an AMD EPYC at 2.3 times it. So the
    trainer (trainer.precision) and the service (measure_dtype) time both precisions instead.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """`auto` is bf16 where the device computes it faster than fp32, and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if supports_bf16(device) else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class DtypeChoice:
    """What `measure_dtype` found: the faster precision, its model ready to serve, every timing."""

    dtype: torch.dtype
    model: GPT
    seconds_per_step: dict[str, float]  # best decode step per candidate, by name (fp32, bf16)


def serving_layout(model: GPT, dtype: torch.dtype) -> GPT:
    """`model` in `dtype` for inference: on the CPU, its linear weights packed for our decode kernels
    (model.decode_linear) where they were built, else for oneDNN where torch has it."""
    model = model.to(dtype).eval()
    return cpu_layout(model) if model.lm_head.weight.device.type == "cpu" else model


def cpu_layout(model: GPT) -> GPT:
    """The CPU's fastest weights for `model`'s linear layers (plain or int8), in place: our kernels
    beat oneDNN's packed weights and torch's int8 product at batch 1 and 8 (bench/bench_kernels.py),
    and keep every row's bits at any row count; without them, oneDNN's packed weights (plain layers)."""
    if native.available():
        return use_native(model)
    if packing.available() and not any(isinstance(m, Int8Linear) for m in model.modules()):
        return packing.pack(model)
    return model


def measure_dtype(
    model: GPT,
    batch_size: int,
    context: int,
    candidates: tuple[str, ...] = ("fp32", "bf16"),
    prepare: Callable[[GPT, torch.dtype], GPT] = serving_layout,
    rounds: int = 2,
) -> DtypeChoice:
    """Time one decode step of `batch_size` rows attending over `context` positions in each candidate
    precision, each prepared by `prepare` (a copy of `model`, which is left as it is), and choose
    the fastest.

    Each candidate runs a warm-up step, then `rounds` steps interleaved with the others' (noise from
    a shared machine hits every candidate alike); the best step counts. On the gpt2 shape at batch
    16 and 1024 positions that is well under a second on two cores.
    """
    unknown = [name for name in candidates if name not in DTYPES]
    if unknown or not candidates:
        raise ValueError(f"unknown dtype {unknown or candidates!r}: choose from {', '.join(DTYPES)}")
    if not 1 <= context <= model.config.block_size:
        raise ValueError(f"context {context} must be between 1 and the model's {model.config.block_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = model.lm_head.weight.device
    prepared = {name: prepare(copy.deepcopy(model), DTYPES[name]) for name in candidates}
    caches = {name: KVCache(model.config, batch_size, context, DTYPES[name], device) for name in candidates}
    best = {name: float("inf") for name in candidates}
    with torch.inference_mode():
        for round_ in range(rounds + 1):
            for name in candidates:
                start = time.perf_counter()
                _decode_step(prepared[name], caches[name], batch_size, context)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_:  # the first round warms up
                    best[name] = min(best[name], time.perf_counter() - start)
    chosen = min(candidates, key=best.__getitem__)
    return DtypeChoice(DTYPES[chosen], prepared[chosen], best)


def _decode_step(model: GPT, cache: KVCache, batch_size: int, context: int) -> None:
    """One decode step of `batch_size` rows at position `context - 1`, grouped as the engine groups them."""
    fewest, most = row_range(model)
    for group in decode_groups(batch_size, fewest, most):
        idx = torch.zeros(max(len(group), fewest), dtype=torch.long, device=cache.k.device)
        model.decode(idx, list(group), [context - 1] * len(group), cache)
