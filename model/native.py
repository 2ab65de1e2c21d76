"""Our decode kernels (model/csrc/decode_kernels.cpp): building them, loading them, choosing their path.

    python -m model.native_build    # what `make install` and the Docker image run

The extension registers torch custom ops (torch.ops.gpt_kernels.*), so the profiler and torch.compile
see them. It is optional: where it was not built (no C++ compiler) or fails to load, `status()` says
why, once in the log, and the model runs on torch's kernels as before.

A path is one instruction set the kernels are compiled for: the best one the CPU has is used, unless
GPT_KERNEL_ISA or `use_path` names another (tests run every path the CPU has this way).
GPT_KERNEL_ISA=none leaves the extension unloaded: torch's kernels, as on a machine without it.
"""

from __future__ import annotations

import functools
import logging
import os
import sysconfig
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Index = the path's number in the C++ source, from the most portable to the fastest.
PATHS = ("scalar", "avx2", "avx512", "avx512_dot")
ENV = "GPT_KERNEL_ISA"
LIBRARY = "_decode_kernels"
SOURCE = Path(__file__).parent / "csrc" / "decode_kernels.cpp"
# What each path needs from the CPU, for error messages.
NEEDS = {"scalar": "nothing", "avx2": "AVX2 and FMA", "avx512": "AVX-512 F and BW",
         "avx512_dot": "AVX-512 F, BW, BF16 and VNNI"}  # fmt: skip

_forced: str | None = None


def library_path() -> Path:
    return Path(__file__).parent / (LIBRARY + sysconfig.get_config_var("EXT_SUFFIX"))


@functools.cache
def _load() -> str | None:
    """Load the extension once; None when it loaded, else why not (logged once)."""
    path = library_path()
    if os.environ.get(ENV) == "none":
        reason = f"{ENV}=none"
    elif not path.exists():
        reason = f"not built: {path.name} missing; `make install` builds it where a C++ compiler is installed"
    else:
        try:
            _load_library(path)
            reason = None
        except OSError as e:
            reason = f"failed to load: {e}"
    if reason is None:
        paths = _cpu_paths()
        log.info("decode kernels: native, path %s (of %s)", os.environ.get(ENV) or paths[-1], ", ".join(paths))
    else:
        log.warning("decode kernels: fallback to torch's, %s", reason)
    return reason


@functools.cache
def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))
    _register_fakes()


def available() -> bool:
    return _load() is None


def status() -> str:
    """One line for logs and /health: `native (<path>)`, or `fallback (<reason>)`."""
    reason = _load()
    return f"native ({path_name()})" if reason is None else f"fallback ({reason})"


def supported_paths() -> list[str]:
    """The paths this CPU can run, most portable first (none without the extension)."""
    return _cpu_paths() if available() else []


def _cpu_paths() -> list[str]:
    return [name for i, name in enumerate(PATHS) if torch.ops.gpt_kernels.path_supported(i)]


def _check(name: str, source: str) -> str:
    if name not in PATHS:
        raise ValueError(f"unknown kernel path {name!r} ({source}): use one of {', '.join(PATHS)}")
    if name not in supported_paths():
        raise ValueError(f"kernel path {name!r} ({source}) needs {NEEDS[name]}, which this CPU lacks")
    return name


def use_path(name: str | None) -> None:
    """Run the kernels on path `name` from now on (None: back to GPT_KERNEL_ISA, or the best)."""
    global _forced
    _forced = None if name is None else _check(name, "use_path")
    _current_path_id.cache_clear()


def path_name() -> str:
    if _forced is not None:
        return _forced
    if os.environ.get(ENV):
        return _check(os.environ[ENV], ENV)
    return supported_paths()[-1]


@functools.cache
def _current_path_id() -> int:
    return PATHS.index(path_name())


@torch.compiler.assume_constant_result
def path_id() -> int:
    """The current path's number, as the ops take it: cached (read on every matrix product), and a
    constant to torch.compile (a compiled model keeps the path it was compiled on)."""
    return _current_path_id()


def _register_fakes() -> None:
    """Shapes without computing, for torch.compile and meta tensors."""

    @torch.library.register_fake("gpt_kernels::linear")
    def _(x, weight, bias, scale, weight_sums, out_features, path):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("gpt_kernels::stream_read")
    def _(buffer, path):
        return buffer.new_empty(())

