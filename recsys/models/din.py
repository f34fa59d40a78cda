"""DIN, the Deep Interest Network (Zhou et al. 2018): histories pooled by attention
against the sample's other features.

A history is a sequence feature (`Pooling.NONE`: `[batch, max_ids, dim]`, padding
positions zero; `recsys-train --sequence COLS`). DIN pools each history as
`sum_i a(q, k_i) * k_i` over its embeddings k_i, where the query q is a linear map of
the pooled features' embeddings and the dense columns (the candidate item, the user, the
context), and `a`, DIN's activation unit, is an MLP over `[q, k, q * k, q - k]` to one
weight. The weights are not normalized (no softmax), as in the paper: the pooled
interest keeps the history's intensity, and a padding position adds `a * 0`, so no mask
is needed. The logit is an MLP over the pooled embeddings, the pooled histories and the
bottom MLP of the dense columns, side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from recsys.embedding import EmbeddingCollection
from recsys.lookup import Activations
from recsys.models.mlp import MLP, linear
from recsys.sparse import JaggedBatch
from recsys.specs import EmbeddingConfig, Pooling


class DIN(nnx.Module):
    """logit = top([pooled embeddings, attention-pooled histories, bottom(dense)])."""

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        dense_features: int,
        bottom: Sequence[int] = (64, 16),
        top: Sequence[int] = (64, 32, 1),
        attention: Sequence[int] = (32,),
        rngs: nnx.Rngs,
        dense_dtype: str = "float32",
    ):
        dims = {config.table(f.table).dim for f in config.features}
        if len(dims) != 1:
            raise ValueError(f"DIN needs one embedding dim for all features, got {sorted(dims)}")
        dim = dims.pop()
        self.pooled = tuple(f.name for f in config.features if f.pooling is not Pooling.NONE)
        self.histories = tuple(f.name for f in config.features if f.pooling is Pooling.NONE)
        if not self.histories:
            raise ValueError("din attends over histories: give it a sequence feature (--sequence COLUMN)")
        if top[-1] != 1:
            raise ValueError(f"DIN: the top MLP must end in 1 logit, got {list(top)}")
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        if dense_features:
            self.bottom = MLP(dense_features, bottom, rngs=rngs, relu_last=True, dense_dtype=dense_dtype)
        else:
            self.bottom = None
        context = len(self.pooled) * dim + (bottom[-1] if dense_features else 0)
        if not context:
            raise ValueError(
                "DIN's query comes from the pooled features and dense columns: the data has neither"
            )
        self.query = linear(context, dim, dense_dtype=dense_dtype, rngs=rngs)
        self.attention = nnx.List(
            [MLP(4 * dim, (*attention, 1), rngs=rngs, dense_dtype=dense_dtype) for _ in self.histories]
        )
        self.top = MLP(context + len(self.histories) * dim, top, rngs=rngs, dense_dtype=dense_dtype)

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        """dense: [batch, dense_features] -> logits [batch]."""
        acts = self.embedding(sparse)
        parts = []
        if self.pooled:
            pooled = acts.stacked(self.pooled)  # [batch, F, dim]
            parts.append(pooled.reshape(pooled.shape[0], -1))
        if self.bottom is not None:
            parts.append(self.bottom(dense))
        context = jnp.concatenate(parts, axis=1)
        q = self.query(context)  # [batch, dim]
        interests = [self._attend(unit, q, acts[name]) for unit, name in zip(self.attention, self.histories)]
        return self.top(jnp.concatenate([context, *interests], axis=1))[:, 0]

    @staticmethod
    def _attend(unit: MLP, q: jax.Array, keys: jax.Array) -> jax.Array:
        """sum_i unit([q, k_i, q k_i, q - k_i]) k_i over a history `keys` [batch, L, dim]."""
        q = jnp.broadcast_to(q[:, None, :], keys.shape)
        weights = unit(jnp.concatenate([q, keys, q * keys, q - keys], axis=-1))  # [batch, L, 1]
        return (weights * keys).sum(axis=1)
