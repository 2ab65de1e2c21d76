"""What goes into best_model.pt, last.pt and final_model.pt, reading last.pt back for a resume, and
the lock that keeps a second trainer out of the folder.

Every file carries the keys the service and `load_checkpoint` read (`step`, `loss`, `val_loss`,
`best_loss`, `learning_rate`) and the run's settings. last.pt adds what an exact resume needs: the
optimizer, the batch sampler's generator, the RNG states and the run's counters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model import load_checkpoint, save_checkpoint
from model.files import lock_folder

BEST, LAST, FINAL = "best_model.pt", "last.pt", "final_model.pt"
LOCK = ".trainer.lock"


@contextmanager
def hold(out: Path) -> Iterator[None]:
    """Keep every other trainer out of `out` while the block runs (FolderInUse if one holds it).

    Two runs writing one folder would interleave their checkpoints and lose one's metrics.jsonl. The
    lock is an flock on OUT/.trainer.lock, which holds the holder's PID (model.files.lock_folder).
    """
    fd = lock_folder(
        out,
        LOCK,
        "another trainer (PID {holder}) is writing to {folder}: wait for it to finish, stop it, or give this run "
        "another --out",
    )
    try:
        yield
    finally:
        os.close(fd)


@dataclass
class Progress:
    """The run's counters; everything here survives a resume."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    loss: float | None = None
    val_loss: float | None = None
    val_step: int | None = None
    best_loss: float | None = None
    best_step: int | None = None
    learning_rate: float = 0.0


def publish(path: Path, model, progress: Progress, settings: dict, data_digest: str, **extra) -> Path:
    """Write one checkpoint atomically, with the seed's keys and the run's description."""
    return save_checkpoint(path, model, **asdict(progress), settings=settings, data_digest=data_digest, **extra)


def resume_state(optimizer, batch_generator: torch.Generator) -> dict:
    """What last.pt holds beyond the model and the counters."""
    state = {
        "optimizer": optimizer.state_dict(),
        "batch_generator": batch_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def read_resume(path: Path, device: torch.device):
    """The model and run state in last.pt, checked to hold a resumable run."""
    model, data = load_checkpoint(path, device)
    missing = [key for key in ("optimizer", "batch_generator", "torch_rng", "step") if key not in data]
    if missing:
        raise ValueError(f"{path} cannot be resumed from: it lacks {', '.join(missing)}")
    return model, data


def restore(data: dict, optimizer, batch_generator: torch.Generator) -> Progress:
    """Put the optimizer, generator and RNGs back as last.pt saved them; return the counters."""
    optimizer.load_state_dict(data["optimizer"])
    batch_generator.set_state(data["batch_generator"])
    torch.set_rng_state(data["torch_rng"])
    if "cuda_rng" in data and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(data["cuda_rng"])
    return Progress(**{key: data[key] for key in Progress.__dataclass_fields__})
