"""Builds the CPU kernel library (`pallas_kernels/cpu/*.cc`) at install time.

Everything else about the package is in pyproject.toml. The library is a plain shared
object that `pallas_kernels.cpu` loads with ctypes and registers with `jax.ffi`; it needs
XLA's FFI headers, which jaxlib ships (hence jaxlib among the build requirements).

A wheel or container built on one CPU must run on another, so nothing is compiled for
the building machine. On x86-64 the library is built once per microarchitecture level
(x86-64-v2: every x86-64 CPU of the last decade; v3: AVX2 and FMA; v4: AVX-512), and the
loader takes the highest level the CPU it runs on has. Elsewhere it is built once, for
the architecture's baseline. Without a working C++17 compiler the install still succeeds
and the training step keeps the XLA path; set RECSYS_REQUIRE_CPU_KERNELS=1 to make a
failed build an error instead.
"""

import copy
import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["pallas_kernels/cpu/embedding_bag.cc", "pallas_kernels/cpu/dense.cc"]
# No FMA contraction: sums round exactly as the XLA path's do.
FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-w"]
X86_64_LEVELS = (2, 3, 4)


def ffi_include_dir() -> str:
    import jaxlib

    return str(Path(jaxlib.__file__).parent / "include")


class OptionalBuildExt(build_ext):
    """A failed kernel build warns (the XLA path remains) unless it is required. Each
    level's objects go to a directory of their own (the sources are the same), so the
    levels build side by side, one per core."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def build_extension(self, ext):
        ext.include_dirs.append(ffi_include_dir())
        # A copy per extension (they build in parallel threads): its own object directory.
        own = copy.copy(self)
        own.build_temp = os.path.join(self.build_temp, ext.name)
        try:
            build_ext.build_extension(own, ext)
        except Exception as e:  # compiler missing or failing
            if os.environ.get("RECSYS_REQUIRE_CPU_KERNELS") == "1":
                raise
            print(
                f"warning: CPU kernels {ext.name} not built ({e}); the XLA path will be used", file=sys.stderr
            )

    def get_ext_filename(self, ext_name):
        # A plain shared library (no Python module init), so no ABI tag in its name.
        return os.path.join(*ext_name.split(".")) + ".so"


def kernel_library(name: str, flags: list[str]) -> Extension:
    return Extension(
        f"pallas_kernels.cpu.{name}",
        sources=SOURCES,
        depends=["pallas_kernels/cpu/parallel.h"],
        language="c++",
        extra_compile_args=FLAGS + flags,
        extra_link_args=["-lpthread"],
    )


def kernel_libraries() -> list[Extension]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [
            kernel_library(f"_kernels_x86_64_v{level}", [f"-march=x86-64-v{level}", "-mtune=generic"])
            for level in X86_64_LEVELS
        ]
    return [kernel_library("_kernels", [])]


setup(ext_modules=kernel_libraries(), cmdclass={"build_ext": OptionalBuildExt})
