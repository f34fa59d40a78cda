"""A plain multi-layer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
    """Linear layers with ReLU between them; the last layer stays linear unless asked."""

    def __init__(self, in_features: int, sizes: Sequence[int], *, rngs: nnx.Rngs, relu_last: bool = False):
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"MLP sizes must be a non-empty list of positive ints, got {list(sizes)}")
        dims = [in_features, *sizes]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.relu_last = relu_last

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1 or self.relu_last:
                x = jax.nn.relu(x)
        return x
