"""A plain multi-layer perceptron, the dense layers' compute precision, and where their
float32 matmuls run (XLA, or the CPU kernels in a single-device step on CPU)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import cpu as cpu_kernels
from pallas_kernels.dtypes import SHORT_NAMES
from recsys.kernels import dense_kernel_takes

# The dense layers' compute dtypes (`check_dense_dtype`), and their short names (`--dense-dtype`).
DENSE_DTYPES = ("float32", "bfloat16")
DENSE_DTYPE_NAMES = {short: name for short, name in SHORT_NAMES.items() if name in DENSE_DTYPES}


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


def _float32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`nnx.Linear`'s dot_general: the CPU kernel inside `recsys.kernels.cpu_dense_layers`, else XLA's."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    plain = tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and not any(batch)
    float32 = plain and rhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32
    if float32 and dense_kernel_takes(lhs.size * rhs.shape[1]):  # m * k * n
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
def mixed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
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


mixed_matmul.defvjp(_mixed_matmul_fwd, _mixed_matmul_bwd)


def _mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
    """`nnx.Linear`'s dot_general (inputs [..., k] by kernel [k, n]) in mixed precision."""
    (contract_lhs, contract_rhs), batch = dimension_numbers
    if tuple(contract_lhs) != (lhs.ndim - 1,) or tuple(contract_rhs) != (0,) or any(batch):
        raise ValueError(f"mixed-precision dot_general takes [..., k] x [k, n], got {dimension_numbers}")
    return mixed_matmul(lhs, rhs)


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
    Inside `recsys.kernels.cpu_dense_layers`, float32 runs through the CPU kernel: XLA:CPU computed the
    batch of small Gram matrices at about 10 GFLOP/s and scattered the backward's gradient."""
    batch, features, dim = emb.shape
    macs = batch * (features + 1) * features // 2 * dim
    if check_dense_dtype(dense_dtype) == "float32" and dense_kernel_takes(macs):
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
