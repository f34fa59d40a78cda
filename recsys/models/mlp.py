"""A plain multi-layer perceptron, the dense layers' compute precision, and where their
float32 matmuls run (XLA, or the CPU kernels in a single-device step on CPU)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recsys import cpu_kernels
from recsys.lookup import KERNELS

# The command lines' short names (`--dense-dtype`) of the dense layers' dtypes.
DENSE_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
DENSE_DTYPES = tuple(DENSE_DTYPE_NAMES.values())


def check_dense_dtype(dense_dtype: str) -> str:
    """`dense_dtype`, or a ValueError listing the choices.

    "bfloat16" is mixed precision: every matmul of the dense layers, forward and
    backward, takes bfloat16 operands and accumulates in float32; parameters,
    activations between layers and gradients stay float32. It is what TPUs do for
    float32 matmuls at default precision, and it runs on bfloat16 matrix units (CPU AMX,
    GPU tensor cores)."""
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype must be one of {', '.join(DENSE_DTYPES)}, got {dense_dtype!r}")
    return dense_dtype


# Whether float32 dense layers being traced run through the CPU kernels (`cpu_dense_kernels`).
_CPU_DENSE_KERNELS = contextvars.ContextVar("recsys_cpu_dense_kernels", default=False)

# Products smaller than this many multiply-adds stay on XLA even inside `cpu_dense_kernels`:
# XLA fuses small layers with their neighbours, and every call out of the program has a
# fixed cost (handing work to OpenBLAS's and the kernels' threads). Small models such as
# the Frappe DLRM (batch 256, layers of 16-71 inputs) gained nothing from the kernels; the
# benchmark DLRM's layers are 27M-4.3G multiply-adds.
KERNEL_MIN_MACS = 1 << 22


def dense_path(kernels: str) -> str:
    """Which implementation runs a single-device step's float32 dense layers: "cpu" or "xla".

    "auto" takes the CPU kernels (`recsys.cpu_kernels.dense_matmul`, `pairwise_dots`) on
    CPU when the kernel library was built and scipy-openblas32 is installed; "cpu"
    requires them; "xla" and "pallas" keep XLA (there are no Pallas dense kernels: on GPU
    and TPU, XLA's own matmuls are the fast path)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "cpu":
        if not cpu_kernels.dense_available():
            raise RuntimeError(f"kernels='cpu': {cpu_kernels.dense_unavailable_reason()}")
        return "cpu"
    on_cpu = kernels == "auto" and jax.default_backend() == "cpu"
    return "cpu" if on_cpu and cpu_kernels.dense_available() else "xla"


@contextlib.contextmanager
def cpu_dense_kernels(enabled: bool = True) -> Iterator[None]:
    """While tracing inside this context, float32 `linear` layers and `pairwise_interactions`
    of at least `KERNEL_MIN_MACS` multiply-adds run through the CPU kernels.
    `recsys.trainer.Trainer` enters it for its step when `dense_path` says "cpu". Only for
    computations on one device: XLA cannot split an FFI call over a sharded batch, so the
    sharded trainer keeps XLA's matmuls."""
    token = _CPU_DENSE_KERNELS.set(enabled)
    try:
        yield
    finally:
        _CPU_DENSE_KERNELS.reset(token)


def _takes_cpu_kernel(macs: int) -> bool:
    """Whether a float32 product of `macs` multiply-adds being traced runs on the CPU kernels."""
    return _CPU_DENSE_KERNELS.get() and macs >= KERNEL_MIN_MACS


def _float32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nnx.Linear`'s dot_general: the CPU kernel inside `cpu_dense_kernels`, else XLA's."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    plain = tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and not any(batch)
    float32 = plain and rhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32
    if float32 and _takes_cpu_kernel(lhs.size * rhs.shape[1]):  # m * k * n
        return cpu_kernels.dense_matmul(lhs, rhs)
    return jax.lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def _bf16(*xs):
    return tuple(x.astype(jnp.bfloat16) for x in xs)


@jax.custom_vjp
def _mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] from bfloat16 operands, float32 result."""
    return _mixed_matmul_fwd(x, w)[0]


def _mixed_matmul_fwd(x, w):
    x16, w16 = _bf16(x, w)
    return jnp.matmul(x16, w16, preferred_element_type=jnp.float32), (x16, w16)


def _mixed_matmul_bwd(residuals, g):
    # Autodiff of a bfloat16 dot with a float32 result would run both backward matmuls
    # in float32 (two thirds of the work): the cotangent is rounded to bfloat16 instead.
    # dx contracts both operands' last axes: XLA:CPU ran `g @ w.T` 3x slower than this.
    x16, w16 = residuals
    (g16,) = _bf16(g)
    dx = jax.lax.dot_general(
        g16, w16, (((g16.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    rows = g16.reshape(-1, g16.shape[-1])
    dw = jnp.matmul(_transposed(x16.reshape(rows.shape[0], -1)), rows, preferred_element_type=jnp.float32)
    return dx, dw


def _transposed(x: jax.Array) -> jax.Array:
    """x.T [k, n] of x [n, k], laid out row-major in memory. XLA:CPU lays a plain `x.T`
    out column-major and multiplies it about 3x slower in bf16 (the weight gradient);
    through a size-1 axis the reshape forces a real transpose."""
    n, k = x.shape
    return x.reshape(n, k, 1).transpose(1, 2, 0).reshape(k, n)


_mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def _mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """`nnx.Linear`'s dot_general (inputs [..., k] by kernel [k, n]) in mixed precision."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    if tuple(contract_lhs) != (lhs.ndim - 1,) or tuple(contract_rhs) != (0,) or any(batch):
        raise ValueError(f"mixed-precision dot_general takes [..., k] x [k, n], got {dimension_numbers}")
    return _mixed_matmul(lhs, rhs)


def linear(a: int, b: int, *, dense_dtype: str = "float32", rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """`nnx.Linear` whose matmul runs in `dense_dtype` (`check_dense_dtype`)."""
    if check_dense_dtype(dense_dtype) == "float32":
        return nnx.Linear(a, b, rngs=rngs, dot_general=_float32_dot_general, **kwargs)
    return nnx.Linear(a, b, dot_general=_mixed_dot_general, rngs=rngs, **kwargs)


@jax.custom_vjp
def _mixed_gram(v: jax.Array) -> jax.Array:
    return _mixed_gram_fwd(v)[0]


def _mixed_gram_fwd(v):
    (v16,) = _bf16(v)
    return jnp.einsum("bfd,bgd->bfg", v16, v16, preferred_element_type=jnp.float32), v16


def _mixed_gram_bwd(v16, g):
    (g16,) = _bf16(g + jnp.swapaxes(g, 1, 2))
    return (jnp.einsum("bfg,bgd->bfd", g16, v16, preferred_element_type=jnp.float32),)


_mixed_gram.defvjp(_mixed_gram_fwd, _mixed_gram_bwd)


def pairwise_dots(vectors: jax.Array, dense_dtype: str = "float32") -> jax.Array:
    """[batch, f, d] -> [batch, f, f] dot products of every pair, in `dense_dtype`."""
    if check_dense_dtype(dense_dtype) == "float32":
        return jnp.einsum("bfd,bgd->bfg", vectors, vectors)
    return _mixed_gram(vectors.astype(jnp.float32))


def pairwise_interactions(x: jax.Array, emb: jax.Array, dense_dtype: str = "float32") -> jax.Array:
    """DLRM's interaction: the dot product of every pair i < j of each sample's vectors
    [x, emb[0], ..., emb[F - 1]] (x [batch, d], emb [batch, F, d]), as
    [batch, (F + 1) * F / 2] in `np.triu_indices(F + 1, 1)` order, in `dense_dtype`.
    Inside `cpu_dense_kernels`, float32 runs through the CPU kernel: XLA:CPU computed the
    batch of small Gram matrices at about 10 GFLOP/s and scattered the backward's gradient."""
    batch, features, dim = emb.shape
    macs = batch * (features + 1) * features // 2 * dim
    if check_dense_dtype(dense_dtype) == "float32" and _takes_cpu_kernel(macs):
        return cpu_kernels.pairwise_dots(x, emb)
    vectors = jnp.concatenate([x[:, None], emb], axis=1)  # [batch, F + 1, d], dtypes promoted
    i, j = np.triu_indices(vectors.shape[1], k=1)
    return pairwise_dots(vectors, dense_dtype)[:, i, j]


class MLP(nnx.Module):
    """Linear layers with ReLU between them; the last layer stays linear unless asked."""

    def __init__(
        self,
        in_features: int,
        sizes: Sequence[int],
        *,
        rngs: nnx.Rngs,
        relu_last: bool = False,
        dense_dtype: str = "float32",
    ):
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"MLP sizes must be a non-empty list of positive ints, got {list(sizes)}")
        dims = [in_features, *sizes]
        self.layers = nnx.List(
            [linear(a, b, dense_dtype=dense_dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
        )
        self.relu_last = relu_last

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.relu_last:
                x = jax.nn.relu(x)
        return x
