"""DCNv2 (Wang et al. 2021): low-rank cross network then a deep MLP, as in MLPerf DLRMv2."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recsys.embedding import EmbeddingCollection
from recsys.lookup import Activations
from recsys.models.dlrm import pooled_feature_dim
from recsys.models.mlp import MLP, linear
from recsys.sparse import JaggedBatch
from recsys.specs import EmbeddingConfig


class LowRankCross(nnx.Module):
    """x_next = x0 * (V (U x) + b) + x, with U: d -> rank and V: rank -> d."""

    def __init__(self, width: int, rank: int, *, rngs: nnx.Rngs, dense_dtype: str = "float32"):
        self.down = linear(width, rank, use_bias=False, dense_dtype=dense_dtype, rngs=rngs)
        self.up = linear(rank, width, dense_dtype=dense_dtype, rngs=rngs)

    def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
        return x0 * self.up(self.down(x)) + x


class DCNv2(nnx.Module):
    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        dense_features: int,
        bottom: Sequence[int] = (512, 256, 128),
        cross_layers: int = 3,
        cross_rank: int = 512,
        top: Sequence[int] = (1024, 1024, 512, 256, 1),
        rngs: nnx.Rngs,
        dense_dtype: str = "float32",
    ):
        """`dense_dtype`: the matmul precision of the MLPs and cross layers
        (`recsys.models.mlp.check_dense_dtype`)."""
        dim = pooled_feature_dim(config, "DCNv2")
        if top[-1] != 1:
            raise ValueError(f"DCNv2: the top MLP must end in 1 logit, got {list(top)}")
        if cross_layers < 1 or cross_rank < 1:
            raise ValueError(
                f"DCNv2: cross_layers and cross_rank must be >= 1, got {cross_layers}, {cross_rank}"
            )
        self.features = tuple(f.name for f in config.features)
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        # Without dense features (e.g. libFM data) there is no bottom MLP.
        self.bottom = (
            MLP(dense_features, bottom, rngs=rngs, relu_last=True, dense_dtype=dense_dtype)
            if dense_features
            else None
        )
        width = (bottom[-1] if dense_features else 0) + len(self.features) * dim
        self.cross = nnx.List(
            [LowRankCross(width, cross_rank, rngs=rngs, dense_dtype=dense_dtype) for _ in range(cross_layers)]
        )
        self.top = MLP(width, top, rngs=rngs, dense_dtype=dense_dtype)

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        """dense: [batch, dense_features] -> logits [batch]."""
        acts = self.embedding(sparse)
        embedded = acts.stacked(self.features)  # [batch, features, dim]
        x0 = embedded.reshape(embedded.shape[0], -1)
        if self.bottom is not None:
            x0 = jnp.concatenate([self.bottom(dense), x0], axis=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.top(x)[:, 0]
