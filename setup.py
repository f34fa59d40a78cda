"""Builds the CPU kernel library (`recsys/cpu_kernels/*.cc`) at install time.

Everything else about the package is in pyproject.toml. The library is a plain shared
object that `recsys.cpu_kernels` loads with ctypes and registers with `jax.ffi`; it needs
XLA's FFI headers, which jaxlib ships (hence jaxlib among the build requirements). It is
compiled for the installing machine (-march=native). Without a working C++17 compiler
the install still succeeds and the training step keeps the XLA path; set
RECSYS_REQUIRE_CPU_KERNELS=1 to make a failed build an error instead.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def ffi_include_dir() -> str:
    import jaxlib

    return str(Path(jaxlib.__file__).parent / "include")


class OptionalBuildExt(build_ext):
    """A failed kernel build warns (the XLA path remains) unless it is required."""

    def build_extension(self, ext):
        ext.include_dirs.append(ffi_include_dir())
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or failing
            if os.environ.get("RECSYS_REQUIRE_CPU_KERNELS") == "1":
                raise
            print(f"warning: recsys CPU kernels not built ({e}); the XLA path will be used", file=sys.stderr)

    def get_ext_filename(self, ext_name):
        # A plain shared library (no Python module init), so no ABI tag in its name.
        return os.path.join(*ext_name.split(".")) + ".so"


setup(
    ext_modules=[
        Extension(
            "recsys.cpu_kernels._kernels",
            sources=["recsys/cpu_kernels/embedding_bag.cc", "recsys/cpu_kernels/dense.cc"],
            depends=["recsys/cpu_kernels/parallel.h"],
            language="c++",
            # No FMA contraction: sums round exactly as the XLA path's do.
            extra_compile_args=["-O3", "-std=c++17", "-march=native", "-ffp-contract=off", "-w"],
            extra_link_args=["-lpthread"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
