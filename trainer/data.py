"""Training text to tokens: read once, tokenized once into a cached file, sampled with a memmap.

A source is a UTF-8 file, `builtin:pydoc` (the standard library's own documentation, so a fresh
machine trains with no network and no files) or an http(s) URL downloaded once into the cache. The
token file's name is the text's SHA-256, so an edited file is tokenized again and an unchanged one
never is. The last `val_fraction` of the tokens is held out for validation.
"""

from __future__ import annotations

import array
import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from model import Tokenizer
from model.checkpoint import atomic_write

BUILTIN = {"builtin:pydoc"}
TOKEN_DTYPE = torch.uint16  # GPT-2's 50,257 ids fit, at half the bytes of int32


class DataError(Exception):
    """A training source that cannot be used; the message says why and what to do."""


def read_source(source: str, cache_dir: Path) -> str:
    """The text behind `source` (file path, builtin:NAME or URL)."""
    if source in BUILTIN:
        return _pydoc_text()
    if source.startswith("builtin:"):
        raise DataError(f"unknown built-in corpus {source!r}: use one of {', '.join(sorted(BUILTIN))}")
    path = download(source, cache_dir) if source.startswith(("http://", "https://")) else Path(source)
    return _read_text(path)


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def download(url: str, cache_dir: Path) -> Path:
    """Fetch `url` into the cache once; later calls reuse the file."""
    name = url.rstrip("/").rsplit("/", 1)[-1] or "download"
    path = cache_dir / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if path.exists():
        return path
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {url}: {reason}. Check the address, or download it and pass --data FILE"
        ) from e
    atomic_write(path, body)
    return path


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"no training text at {path}: pass --data FILE, or --data builtin:pydoc for the built-in corpus"
        ) from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder: --data takes a text file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty: give a file with some text to learn from")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8.txt`"
        ) from None


def tokenize(text: str, cache_dir: Path) -> Path:
    """The token file for `text`, written on first use."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    path = cache_dir / f"tokens-{digest[:32]}.u16"
    if not path.exists():
        atomic_write(path, array.array("H", Tokenizer().encode(text)).tobytes())
    return path


@dataclass
class Dataset:
    """Train and validation token streams, with batches drawn at random offsets."""

    train: torch.Tensor
    val: torch.Tensor
    digest: str

    @classmethod
    def load(cls, token_file: Path, val_fraction: float, seq_len: int) -> Dataset:
        count = token_file.stat().st_size // TOKEN_DTYPE.itemsize
        tokens = torch.from_file(str(token_file), shared=False, size=count, dtype=TOKEN_DTYPE)
        n_val = int(count * val_fraction)
        need = seq_len + 1
        if count - n_val < need or n_val < need:
            raise DataError(
                f"the training text has {count} tokens: too few for one sequence of {seq_len} tokens in both "
                f"the training part and the validation part ({val_fraction:.0%}); give more text or a smaller --seq-len"
            )
        digest = token_file.stem.removeprefix("tokens-")
        return cls(train=tokens[: count - n_val], val=tokens[count - n_val :], digest=digest)

    def offsets(self, split: str, count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """`count` random sequence starts in `split`."""
        tokens = self.train if split == "train" else self.val
        return torch.randint(len(tokens) - seq_len, (count,), generator=generator)

    def batch(self, split: str, offsets: torch.Tensor, seq_len: int, device: torch.device):
        """Inputs and next-token targets (B, seq_len) for the sequences starting at `offsets`."""
        tokens = self.train if split == "train" else self.val
        window = tokens[offsets[:, None] + torch.arange(seq_len + 1)].to(torch.long)
        x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def prepare(source: str, cache_dir: Path) -> Path:
    """Read, check and tokenize `source`; return its token file."""
    return tokenize(read_source(source, cache_dir), cache_dir)
