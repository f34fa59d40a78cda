"""Keeps XLA:CPU's per-step buffers in the process instead of handing them back to the OS.

Every run of a compiled program on the CPU backend allocates its temporary buffer and its
outputs with `posix_memalign`, and frees them when the step ends. glibc's malloc serves
any block over 32 MB (and any block a worker thread asks for that does not fit its 64 MB
arena) with a fresh `mmap`, and `munmap`s it on free, so the next step faults in new
pages (docs/kernels.md has the cost).

`tune()` (`recsys.tune_host_malloc()`; the CLI and the benchmarks call it first) therefore
sets, through `mallopt`:
  - one arena (M_ARENA_MAX = 1): every thread allocates from the main heap, which grows
    without a size limit, so large blocks need no `mmap`;
  - no `mmap` for large blocks (M_MMAP_MAX = 0);
  - no trimming of the heap's free top below 2 GiB (M_TRIM_THRESHOLD), so freed step
    buffers stay mapped for the next step.
The process keeps its peak heap instead of returning freed memory to the OS, as a
training process usually does anyway (PyTorch's and XLA's GPU allocators do the same).

M_ARENA_MAX only takes effect if no worker thread has allocated yet, which in a JAX
process means before its first computation: call it before running anything on JAX
(importing jax itself is fine). Importing `recsys` changes nothing; `state()` says what
the last call did.

`RECSYS_HOST_MALLOC` chooses: "auto" (the default) tunes only where JAX will compute on
the CPU (`JAX_PLATFORMS` is "cpu", or it is unset and no GPU/TPU plugin is installed),
since an accelerator host's big buffers live on the device and its input threads may
prefer several arenas; "on" tunes anyway; "off" leaves malloc alone. Nothing is changed
either when the environment already sets glibc's malloc options (MALLOC_ARENA_MAX,
MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES with glibc.malloc): the
user's choice stands. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

ENV = "RECSYS_HOST_MALLOC"
CHOICES = ("auto", "on", "off")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest it accepts, 2 GiB

# The same settings as environment variables, read by glibc when a process starts (for
# another program, such as the TorchRec peer benchmark: `python -m benchmarks.bench --peer-malloc tuned`).
ENVIRONMENT = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
}
_USER_SETTINGS = tuple(ENVIRONMENT)


def is_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose malloc `tune` sets."""
    return sys.platform == "linux" and (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


def _accelerator() -> str | None:
    """The GPU/TPU plugin JAX would find, if one is installed."""
    if importlib.util.find_spec("libtpu") is not None:
        return "libtpu"
    if importlib.util.find_spec("jax_plugins") is not None:
        return "a jax_plugins package"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return f"the jax_plugins entry point {plugins[0].name!r}" if plugins else None


def _reason_to_skip(choice: str, environ) -> str | None:
    if not is_glibc():
        return "not glibc"
    user = [name for name in _USER_SETTINGS if name in environ]
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:
        return f"the environment sets {', '.join(user)}"
    if choice == "auto":
        platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
        if platforms and platforms[0] != "cpu":
            return f"JAX_PLATFORMS={environ['JAX_PLATFORMS']} computes off the CPU"
        if not platforms and (found := _accelerator()) is not None:
            return f"{found} is installed (JAX may compute on an accelerator)"
    return None


def _jax_has_computed() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is not None and bridge.backends_are_initialized()


_state = "not tuned: recsys.tune_host_malloc() was not called"


def state() -> str:
    """What the last `tune()` did (or that it was never called)."""
    return _state


def tune(environ=os.environ) -> str:
    """Applies the settings above (again is harmless) and returns what happened, also
    kept for `state()`: "tuned", "tuned, but JAX had already computed: ...", "partly:
    ..." or "off: <why>". Raises ValueError for an unknown `RECSYS_HOST_MALLOC`."""
    global _state
    _state = _tune(environ)
    return _state


def _tune(environ) -> str:
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {environ[ENV]!r}")
    if choice == "off":
        return f"off: {ENV}=off"
    if (reason := _reason_to_skip(choice, environ)) is not None:
        return f"off: {reason}"
    late = _jax_has_computed()
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)):
        if mallopt(param, value) != 1:
            return f"partly: mallopt({param}, {value}) failed"
    if late:
        return "tuned, but JAX had already computed: its worker threads keep their own arenas"
    return "tuned"
