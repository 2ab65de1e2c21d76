"""torchrun plumbing: who this process is, the process group, and the few collectives the loop needs.

Without torchrun every function here degrades to the single-process case, so the loop has no
special cases: rank 0 of a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import resolve_device


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_name: str) -> Context:
    """Join the torchrun process group if launched by torchrun; choose this process's device."""
    if "RANK" not in os.environ:
        return Context(0, 1, resolve_device(device_name))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0 and restarts_may_hang():
        print(SHARED_STORE_WARNING, flush=True)
    return Context(rank, world_size, device)


# torchrun's c10d rendezvous (torch 2.13) hands its workers one TCP store for the agent's whole life. After
# an elastic restart the new workers meet the keys the dead ones left there, and a replaced node waits for
# the store address of a round that never publishes it: both hang. A store per round avoids it.
SHARED_STORE_WARNING = (
    "warning: torchrun shares its rendezvous store with the workers, so an elastic restart (--max-restarts) "
    "can wait forever on the last attempt's keys; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun"
)


def restarts_may_hang() -> bool:
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)  # fmt: skip


def teardown(ctx: Context) -> None:
    if ctx.enabled:
        dist.destroy_process_group()


def total(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The sum of `value` over all processes."""
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value)
    return value


def mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The average of `value` over all processes."""
    return total(value, ctx) / ctx.world_size


def any_true(flags: list[bool], ctx: Context) -> list[bool]:
    """Each flag, set if it is set on any process, so every rank stops at the same step and none
    waits forever in a collective the others have left."""
    if not ctx.enabled:
        return flags
    value = torch.tensor([int(f) for f in flags], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v) for v in value.tolist()]


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()
