"""Compile our decode kernels (model/csrc/decode_kernels.cpp) next to model/native.py, which loads them.

    python -m model.native_build    # `make install` and the Docker image run it

Without a C++ compiler (or torch's headers) it says so and exits 0: the model then runs on torch's
kernels, and model.native.status() says why.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from model.native import LIBRARY, SOURCE, library_path


def build() -> Path:
    """Compile the extension with the system's C++ compiler (one job); return the library's path."""
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -Wno-(maybe-)uninitialized: GCC 12 warns inside its own AVX-512 headers.
    flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wno-maybe-uninitialized", "-Wno-uninitialized"]
    extension = CppExtension(LIBRARY, [str(SOURCE)], extra_compile_args=flags, extra_link_args=["-fopenmp"])
    library_path().unlink(missing_ok=True)  # a failed build must not leave an older library to load
    with tempfile.TemporaryDirectory() as temp:
        setup(
            name=LIBRARY,
            ext_modules=[extension],
            cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
            script_args=["--quiet", "build_ext", "--force", "--build-lib", str(library_path().parent), "--build-temp", temp],
        )
    return library_path()


if __name__ == "__main__":
    try:
        print(f"decode kernels built: {build()}")
    except (Exception, SystemExit) as e:  # no compiler, no headers: the model still serves on torch's kernels
        print(f"decode kernels not built ({e}); the model will run on torch's kernels", file=sys.stderr)
