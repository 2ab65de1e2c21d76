"""Checkpoints: one `.pt` file per snapshot, written atomically and read without unpickling code.

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and dicts, so
`torch.load(weights_only=True)` reads it and a file crafted to run code is refused, not run.
"""

from __future__ import annotations

import glob
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn as nn

from model.files import NotRegularFile, open_regular_file
from model.gpt import GPT, GPTConfig
from model.tokenizer import ENCODING_NAME

FORMAT = "gpt-service/checkpoint-v1"


class CheckpointError(Exception):
    """A file that is not a loadable checkpoint: missing, truncated, corrupt, foreign or mismatched."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path, model: nn.Module, **metadata) -> Path:
    """Write `model` and `metadata` to `path` atomically: readers see the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
    `path`; a writer killed at any moment leaves at worst a stray temporary file, never a torn
    checkpoint. Metadata must be plain data (numbers, strings, lists, dicts, tensors).
    """
    path = Path(path)
    plain = unwrap(model)
    payload = {
        "format": FORMAT,
        "config": plain.config.to_dict(),
        "tokenizer": ENCODING_NAME,
        **metadata,
        "model": plain.state_dict(),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getbuffer())
    return path


def atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_temporaries(path) -> list[Path]:
    """Delete the temporary files that writers of `path` killed mid-write left behind; return them.

    Call it only where no other process is writing `path`.
    """
    path = Path(path)
    stale = list(path.parent.glob(f"{glob.escape(_temporary_prefix(path))}*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def read_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dictionary at `path`, checked for our format; raises CheckpointError otherwise."""
    path = Path(path)
    with _open_regular_file(path) as f:
        try:
            data = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # any parse failure means the same thing to the caller: not a checkpoint
            raise CheckpointError(f"{path}: not a readable checkpoint ({_first_line(e)})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a gpt-service checkpoint (format marker {FORMAT!r} missing)")
    for key in ("config", "model"):
        if not isinstance(data.get(key), dict):
            raise CheckpointError(f"{path}: checkpoint has no {key!r} section")
    return data


def _open_regular_file(path: Path) -> BinaryIO:
    """`path` opened for reading by model.files' one safe way (a FIFO, device or socket named like a
    checkpoint would otherwise block its reader forever); CheckpointError otherwise."""
    try:
        return open_regular_file(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such checkpoint") from e
    except NotRegularFile as e:
        raise CheckpointError(str(e)) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from e


def check_finite(model: nn.Module, source) -> None:
    """CheckpointError naming the first weight of `model` that holds NaN or Inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: weight {name} holds NaN or Inf values")


def load_checkpoint(path, device="cpu") -> tuple[GPT, dict]:
    """Rebuild the model saved at `path` on `device`; return it with the checkpoint's metadata.

    A checkpoint whose weights are not all finite is refused: it would generate garbage.
    """
    data = read_checkpoint(path)
    try:
        config = GPTConfig.from_dict(data["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config ({e})") from e
    with torch.device("meta"):
        model = GPT(config)
    try:
        model.load_state_dict(data.pop("model"), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match its config ({_first_line(e)})") from e
    model.lm_head.weight = model.transformer.wte.weight
    check_finite(model, path)
    return model.to(device).eval(), data


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
