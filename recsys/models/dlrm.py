"""DLRM (Naumov et al. 2019): bottom MLP, pairwise dot interaction, top MLP."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recsys.embedding import EmbeddingCollection
from recsys.lookup import Activations
from recsys.models.mlp import MLP, pairwise_interactions
from recsys.sparse import JaggedBatch
from recsys.specs import EmbeddingConfig, Pooling


def pooled_feature_dim(config: EmbeddingConfig, model: str) -> int:
    """The single embedding dim all features must share for `model`'s interaction."""
    dims = {config.table(f.table).dim for f in config.features}
    sequence = [f.name for f in config.features if f.pooling is Pooling.NONE]
    if sequence:
        raise ValueError(
            f"{model} needs pooled features; {sequence} have pooling 'none' (histories: --model din)"
        )
    if len(dims) != 1:
        raise ValueError(f"{model} needs one embedding dim for all features, got {sorted(dims)}")
    return dims.pop()


class DLRM(nnx.Module):
    """logit = top([bottom(dense), dot products of all pairs of (bottom(dense), embeddings)])."""

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        dense_features: int,
        bottom: Sequence[int] = (512, 256, 128),
        top: Sequence[int] = (1024, 1024, 512, 256, 1),
        rngs: nnx.Rngs,
        dense_dtype: str = "float32",
    ):
        """`dense_dtype`: the MLPs' and the interaction's matmul precision
        (`recsys.models.mlp.check_dense_dtype`); embeddings and parameters stay as they are."""
        dim = pooled_feature_dim(config, "DLRM")
        if bottom[-1] != dim:
            raise ValueError(f"DLRM: the bottom MLP must end in the embedding dim {dim}, got {list(bottom)}")
        if top[-1] != 1:
            raise ValueError(f"DLRM: the top MLP must end in 1 logit, got {list(top)}")
        self.features = tuple(f.name for f in config.features)
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        if dense_features:
            self.bottom = MLP(dense_features, bottom, rngs=rngs, relu_last=True, dense_dtype=dense_dtype)
        else:
            # No dense features (e.g. libFM data): a learned vector takes the bottom MLP's
            # place, so its dot products with the embeddings give every id a linear term.
            self.bottom = None
            self.anchor = nnx.Param(jax.random.normal(rngs.params(), (dim,)) / np.sqrt(dim))
        vectors = len(self.features) + 1
        self.top = MLP(dim + vectors * (vectors - 1) // 2, top, rngs=rngs, dense_dtype=dense_dtype)
        self.dense_dtype = dense_dtype

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        """dense: [batch, dense_features] -> logits [batch]."""
        acts = self.embedding(sparse)
        embedded = acts.stacked(self.features)  # [batch, F, dim]
        if self.bottom is not None:
            x = self.bottom(dense)  # [batch, dim]
        else:
            x = jnp.broadcast_to(self.anchor.get_value(), (embedded.shape[0], embedded.shape[2]))
        interactions = pairwise_interactions(x, embedded, self.dense_dtype)  # [batch, (F+1)F/2]
        return self.top(jnp.concatenate([x, interactions], axis=1))[:, 0]
