"""Where every computation with a kernel runs: Pallas, the CPU kernels, or XLA.

One choice, `kernels` ("auto", "xla", "cpu" or "pallas"), given to a trainer or the CLI,
decides four things here and nowhere else:
- `table_path`: the lookup of a stacked table (or an owner's block);
- `rows_update_path`: the sparse update of its rows;
- `owner_update_path`: the update on the owners of a sharded group;
- `dense_path`: a single-device step's float32 dense layers (`cpu_dense_layers`).

"auto" takes Pallas on GPU and TPU (on GPU for power-of-two widths, which Triton
needs) where each kernel passed its self-check on this backend (`recsys.kernel_check`:
compiled on a tiny input and compared with its reference; XLA, with one warning line,
where not), the CPU kernels on CPU where they were built and apply (float32 tables; the
update kernel is row-wise Adagrad with float32 state), and XLA otherwise. "cpu" requires
the CPU kernel library; "pallas" takes Pallas anywhere, interpreted on CPU (slow: for
tests); "xla" never takes a kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax.numpy as jnp

from pallas_kernels import cpu as cpu_kernels
from recsys import kernel_check
from recsys.specs import OptimizerKind, SparseOptimizerSpec

KERNELS = ("auto", "xla", "cpu", "pallas")

# Dense products smaller than this many multiply-adds stay on XLA even on the CPU path:
# XLA fuses small layers with their neighbours, and every call out of the program has a
# fixed cost (handing work to OpenBLAS's and the kernels' threads).
DENSE_KERNEL_MIN_MACS = 1 << 22


def check(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return kernels


def table_path(dtype, width: int, kernels: str) -> str:
    """ "pallas", "cpu" or "xla": how a table (or an owner's block) `width` wide in
    `dtype` is looked up."""
    backend = kernel_check.backend()
    if check(kernels) == "pallas":
        return "pallas"
    if kernels == "auto" and backend in ("gpu", "tpu"):
        fits = backend == "tpu" or (width > 0 and width & (width - 1) == 0)
        return "pallas" if fits and kernel_check.lookup_ok(dtype, width) else "xla"
    if kernels == "xla" or jnp.dtype(dtype) != jnp.float32:
        return "xla"
    if kernels == "cpu":
        if not cpu_kernels.available():
            raise RuntimeError(f"kernels='cpu': {cpu_kernels.unavailable_reason()}")
        return "cpu"
    return "cpu" if backend == "cpu" and cpu_kernels.available() else "xla"


def rows_update_path(dtype, width: int, spec: SparseOptimizerSpec, kernels: str) -> str:
    """How rows `width` wide in `dtype` are updated under `spec`: a fused kernel ("pallas":
    every optimizer; "cpu": row-wise Adagrad with float32 state) or "xla"."""
    path = table_path(dtype, width, kernels)
    if path == "cpu" and (spec.kind is not OptimizerKind.ROWWISE_ADAGRAD or spec.state_dtype != "float32"):
        return "xla"
    if path == "pallas" and kernels == "auto" and not kernel_check.update_ok(dtype, width, spec):
        return "xla"
    return path


def owner_update_path(dtype, width: int, spec: SparseOptimizerSpec, column_split: bool, kernels: str) -> str:
    """`rows_update_path` on the owners of a sharded group of shards `width` wide. Row-wise
    Adagrad over column shards needs the whole row's statistic, which only the XLA path
    takes."""
    path = rows_update_path(dtype, width, spec, kernels)
    return "xla" if column_split and spec.kind is OptimizerKind.ROWWISE_ADAGRAD else path


def verify(groups, kernels: str) -> None:
    """Runs now, outside any trace, the Pallas self-checks "auto" needs for `groups`
    ((dtype, width, sparse optimizer spec) of each table group), and makes every process
    agree on them."""
    if check(kernels) != "auto" or kernel_check.backend() not in ("gpu", "tpu"):
        return
    for dtype, width, spec in groups:
        rows_update_path(dtype, width, spec, kernels)  # the lookup's check, then the update's
    kernel_check.agree()


def dense_path(kernels: str) -> str:
    """ "cpu" or "xla": where a single-device step's float32 dense layers run. The CPU
    kernels (OpenBLAS's sgemm, DLRM's pairwise interaction) need the kernel library and
    scipy-openblas32; on GPU and TPU XLA's own matmuls are the fast path."""
    if check(kernels) == "cpu":
        if not cpu_kernels.dense_available():
            raise RuntimeError(f"kernels='cpu': {cpu_kernels.dense_unavailable_reason()}")
        return "cpu"
    on_cpu = kernels == "auto" and kernel_check.backend() == "cpu"
    return "cpu" if on_cpu and cpu_kernels.dense_available() else "xla"


# Whether float32 dense layers being traced run through the CPU kernels. A context rather
# than an argument: the layers sit inside the user's model, which the trainer only calls.
_CPU_DENSE_LAYERS = contextvars.ContextVar("recsys_cpu_dense_layers", default=False)


@contextlib.contextmanager
def cpu_dense_layers(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this context, float32 dense products of at least
    `DENSE_KERNEL_MIN_MACS` multiply-adds (`recsys.models.mlp`) run through the CPU
    kernels. Only for computations on one device: XLA cannot split an FFI call over a
    sharded batch, so the sharded trainer keeps XLA's matmuls."""
    token = _CPU_DENSE_LAYERS.set(enabled)
    try:
        yield
    finally:
        _CPU_DENSE_LAYERS.reset(token)


def dense_kernel_takes(macs: int) -> bool:
    """Whether a float32 dense product of `macs` multiply-adds being traced runs on the
    CPU kernels."""
    return _CPU_DENSE_LAYERS.get() and macs >= DENSE_KERNEL_MIN_MACS
