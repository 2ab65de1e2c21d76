"""The training precision: given, kept from the run being resumed, or on a CPU measured at start-up.

Whether bf16 trains faster than fp32 on a CPU is not written in its flags: AMX makes bf16 products
several times faster, AVX512-BF16 alone made them 2.3× faster on one AMD EPYC and half as fast on an
older part, and the loss, attention and optimizer shares of a step differ by model shape. So `--dtype
auto` on a CPU times a training step of the run's own shape in each precision and trains in the faster.
GPUs keep the rule that holds for them (bf16 where the device supports it).
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import GPT, autocast_dtype
from model.device import DTYPES
from trainer import distributed

# Timed rounds per precision after a warm-up step, interleaved so that load from other work hits both alike.
ROUNDS = 2
# Sequences per timed pass: a step's cost grows with its sequences alike in both precisions, and a few
# keep the measurement to seconds at start-up rather than a minute of full batches.
SEQUENCES = 4


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, and how it was chosen (for the run's first lines)."""

    dtype: torch.dtype
    reason: str
    seconds_per_step: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return next(name for name, dtype in DTYPES.items() if dtype == self.dtype)


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype):
    """The forward pass's precision: nothing to do in fp32, autocast otherwise."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device.type, dtype=dtype), ExitStack() as stack:
        if device.type == "cpu":
            # The CPU flash-attention kernel's bf16 backward runs 3x slower than its fp32 one; the
            # plain matrix-product attention is faster than both at a training sequence's length.
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


def choose(requested: str, resumed: str | None, model: GPT, batch_size: int, seq_len: int,
           ctx: distributed.Context) -> Precision:  # fmt: skip
    """`requested` as given; for `auto`, a resumed run's precision (its steps continue exactly), on a CPU
    the faster of fp32 and bf16 at this shape (every process agrees on rank 0's finding), elsewhere
    `autocast_dtype`'s rule."""
    if requested != "auto":
        return Precision(DTYPES[requested], "as asked")
    if resumed in DTYPES:
        return Precision(DTYPES[resumed], "as the resumed run trained")
    if ctx.device.type != "cpu":
        return Precision(autocast_dtype(ctx.device), "auto")
    seconds = time_passes(model, batch_size, seq_len, ctx.device)
    bf16_faster = torch.tensor(float(seconds["bf16"] < seconds["fp32"]), device=ctx.device)
    if ctx.enabled:
        torch.distributed.broadcast(bf16_faster, src=0)
    dtype = torch.bfloat16 if bf16_faster.item() else torch.float32
    return Precision(dtype, "auto: the faster at this shape", seconds)


def time_passes(model: GPT, batch_size: int, seq_len: int, device: torch.device) -> dict[str, float]:
    """The best time of a forward and backward pass over random sequences (`batch_size`, at most SEQUENCES)
    of `seq_len` tokens in each precision.

    The gradients it makes are dropped, and it draws its tokens from a generator of its own, so the run's
    weights and random streams are as they were."""
    generator, rng = torch.Generator().manual_seed(0), torch.get_rng_state()  # dropout draws from torch's
    shape = (min(batch_size, SEQUENCES), seq_len)
    x, y = (torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device) for _ in range(2))
    best = {name: float("inf") for name in DTYPES}
    for round_ in range(ROUNDS + 1):
        for name, dtype in DTYPES.items():
            start = time.perf_counter()
            with autocast(device, dtype):
                _, loss = model(x, y)
            loss.backward()
            if round_:  # the first round warms up
                best[name] = min(best[name], time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return best


def describe(precision: Precision) -> str:
    """`bfloat16 (auto: the faster at this shape; a pass 212 ms in bf16, 455 ms in fp32)`."""
    timings = ", ".join(f"{1000 * s:.0f} ms in {name}" for name, s in precision.seconds_per_step.items())
    return f"{str(precision.dtype).removeprefix('torch.')} ({precision.reason}" + (
        f"; a pass {timings})" if timings else ")")
