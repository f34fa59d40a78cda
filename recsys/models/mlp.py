"""A plain multi-layer perceptron, and the dense layers' compute precision."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DENSE_DTYPES = ("float32", "bfloat16")
# The command lines' short names (`--dense-dtype`).
DENSE_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def compute_dtype(dense_dtype: str):
    """The dtype matmuls take their inputs in: None (float32, as given) or bfloat16.

    bfloat16 is mixed precision: parameters stay float32 and are cast per use, products
    accumulate in float32 and activations between layers stay float32. It is what TPUs
    do for float32 matmuls at default precision, and it runs on bfloat16 matrix units
    (CPU AMX, GPU tensor cores)."""
    if dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype must be one of {', '.join(DENSE_DTYPES)}, got {dense_dtype!r}")
    return None if dense_dtype == "float32" else jnp.bfloat16


def linear(a: int, b: int, *, dense_dtype: str = "float32", rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """`nnx.Linear` computing in `dense_dtype` (`compute_dtype`), returning float32."""
    dtype = compute_dtype(dense_dtype)
    if dtype is None:
        return nnx.Linear(a, b, rngs=rngs, **kwargs)
    return nnx.Linear(a, b, dtype=dtype, preferred_element_type=jnp.float32, rngs=rngs, **kwargs)


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
