"""The baselines and their deep variants over the same features as DLRM: logistic
regression, a factorization machine (Rendle 2010), DeepFM (Guo et al. 2017) and Wide &
Deep (Cheng et al. 2016). Their per-id weights live in an `EmbeddingCollection`, so they
train, shard and cache like any other model.

Logistic regression: logit = b + w . dense + sum over features of the pooled per-id
weights (tables of dim 1).

Factorization machine: the same linear terms, plus the pairwise dot products of every
two fields' factor vectors, summed: 0.5 * ((sum of the vectors)^2 - sum of their
squares), per factor. A field is a sparse feature (its pooled factor vector) or a dense
column (its value times a learned vector). Each table holds a row's weight in column 0
and its factors after it (dim = factors + 1), so one lookup serves both terms.

DeepFM: the factorization machine plus an MLP over the fields' factor vectors side by
side and the dense columns, sharing the embeddings. Wide & Deep: logistic regression (the
wide part) plus that MLP (the deep part), on the same weight-and-vector tables.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recsys.embedding import EmbeddingCollection
from recsys.lookup import Activations
from recsys.models.dlrm import pooled_feature_dim
from recsys.models.mlp import MLP
from recsys.sparse import JaggedBatch
from recsys.specs import EmbeddingConfig, InitializerSpec


def baseline_tables(model: str, config: EmbeddingConfig, factors: int) -> EmbeddingConfig:
    """`config`'s tables shaped for `model`: "lr", dim 1 and zeros (a weight per id, starting
    at 0); the others, dim factors + 1 (a weight, then the factors) drawn as configured at
    scale 1 / sqrt(dim * fields): the sum over field pairs of their factors' dot products
    then starts near 0 however many fields there are (at 1 / sqrt(dim), Criteo's 39 fields
    began with logits of standard deviation near 7, and the FM diverged)."""
    if model == "lr":
        return dataclasses.replace(
            config,
            tables=tuple(
                dataclasses.replace(t, dim=1, initializer=InitializerSpec(kind="zeros"))
                for t in config.tables
            ),
        )
    dim = factors + 1
    scale = 1 / np.sqrt(dim * len(config.features))
    tables = tuple(
        dataclasses.replace(t, dim=dim, initializer=dataclasses.replace(t.initializer, scale=scale))
        for t in config.tables
    )
    return dataclasses.replace(config, tables=tables)


class _Linear(nnx.Module):
    """b + w . dense."""

    def __init__(self, dense_features: int, rngs: nnx.Rngs):
        del rngs  # zeros: the linear part starts at the prior's logit 0
        self.bias = nnx.Param(jnp.zeros(()))
        self.dense = nnx.Param(jnp.zeros((dense_features,)))

    def __call__(self, dense: jax.Array) -> jax.Array:
        return self.bias.get_value() + dense @ self.dense.get_value()


class LogisticRegression(nnx.Module):
    """logit = b + w . dense + the sum of every feature's pooled id weights."""

    def __init__(self, config: EmbeddingConfig, *, dense_features: int, rngs: nnx.Rngs):
        if pooled_feature_dim(config, "lr") != 1:
            raise ValueError("lr: the tables hold one weight per id (dim 1); see baseline_tables")
        self.features = tuple(f.name for f in config.features)
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        self.linear = _Linear(dense_features, rngs)

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        weights = self.embedding(sparse).stacked(self.features)  # [batch, F, 1]
        return self.linear(dense) + weights[:, :, 0].sum(axis=1)


class FactorizationMachine(nnx.Module):
    """logit = b + w . dense + sum of id weights + sum over field pairs of <v_a, v_b>."""

    def __init__(self, config: EmbeddingConfig, *, dense_features: int, rngs: nnx.Rngs):
        factors = _weight_and_factors(config, "fm")
        self.features = tuple(f.name for f in config.features)
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        self.linear = _Linear(dense_features, rngs)
        # Scaled as `baseline_tables` scales the tables' factors, over every field.
        fields = len(self.features) + dense_features
        self.dense_factors = nnx.Param(
            jax.random.normal(rngs.params(), (dense_features, factors)) / np.sqrt((factors + 1) * fields)
        )

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        rows = self.embedding(sparse).stacked(self.features)  # [batch, F, 1 + factors]
        weights, fields = rows[:, :, 0], rows[:, :, 1:]
        v = self.dense_factors.get_value()
        total = fields.sum(axis=1) + dense @ v  # every field's vector, summed: [batch, factors]
        squares = (fields**2).sum(axis=1) + (dense**2) @ (v**2)
        pairs = 0.5 * (total**2 - squares).sum(axis=1)
        return self.linear(dense) + weights.sum(axis=1) + pairs


def _weight_and_factors(config: EmbeddingConfig, model: str) -> int:
    """The factors per field of `model`'s tables (dim - 1, at least 1)."""
    dim = pooled_feature_dim(config, model)
    if dim < 2:
        raise ValueError(f"{model}: the tables hold a weight and the factors (dim >= 2), got {dim}")
    return dim - 1


class _Deep(nnx.Module):
    """An MLP over the fields' vectors side by side and the dense columns, to one logit."""

    def __init__(self, config: EmbeddingConfig, model: str, dense_features: int, sizes, *, rngs, dense_dtype):
        if sizes[-1] != 1:
            raise ValueError(f"the deep MLP must end in 1 logit, got {list(sizes)}")
        width = len(config.features) * _weight_and_factors(config, model) + dense_features
        self.mlp = MLP(width, sizes, rngs=rngs, dense_dtype=dense_dtype)

    def __call__(self, dense: jax.Array, fields: jax.Array) -> jax.Array:
        flat = fields.reshape(fields.shape[0], -1)
        return self.mlp(jnp.concatenate([flat, dense], axis=1))[:, 0]


class DeepFM(nnx.Module):
    """logit = the factorization machine's + deep([field vectors, dense])."""

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        dense_features: int,
        top=(64, 32, 1),
        rngs: nnx.Rngs,
        dense_dtype: str = "float32",
    ):
        self.fm = FactorizationMachine(config, dense_features=dense_features, rngs=rngs)
        self.deep = _Deep(config, "deepfm", dense_features, top, rngs=rngs, dense_dtype=dense_dtype)

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        acts = self.fm.embedding(sparse)
        fields = acts.stacked(self.fm.features)[:, :, 1:]
        return self.fm(dense, acts) + self.deep(dense, fields)


class WideDeep(nnx.Module):
    """logit = b + w . dense + the ids' weights (wide) + deep([field vectors, dense])."""

    def __init__(
        self,
        config: EmbeddingConfig,
        *,
        dense_features: int,
        top=(64, 32, 1),
        rngs: nnx.Rngs,
        dense_dtype: str = "float32",
    ):
        self.features = tuple(f.name for f in config.features)
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        self.linear = _Linear(dense_features, rngs)
        self.deep = _Deep(config, "wide_deep", dense_features, top, rngs=rngs, dense_dtype=dense_dtype)

    def __call__(self, dense: jax.Array, sparse: JaggedBatch | Activations) -> jax.Array:
        rows = self.embedding(sparse).stacked(self.features)  # [batch, F, 1 + factors]
        return self.linear(dense) + rows[:, :, 0].sum(axis=1) + self.deep(dense, rows[:, :, 1:])
