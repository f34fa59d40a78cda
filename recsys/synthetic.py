"""Synthetic click data with Zipf-distributed multi-hot ids and a planted ground truth.

Each table has a hidden per-row effect and a hidden low-rank vector; a sample's logit is
  bias + dense . w + sum_f mean(effect_f[ids]) + sum_{(f, g) pairs} <mean u_f, mean u_g>
and its label is drawn from sigmoid(logit). The planted logits are kept, so the AUC of
the truth itself is known and a correct trainer can be checked against it.

Ids are drawn from a Zipf law truncated to the table (np.random.zipf is unbounded) and
then permuted per table, so hot ids are scattered like hashed ids.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recsys.data.examples import Examples
from recsys.sparse import RaggedIds
from recsys.specs import EmbeddingConfig, FeatureSpec, Pooling, SparseOptimizerSpec, TableSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    num_dense: int = 13
    num_sparse: int = 8
    rows: int = 2000
    max_ids: int = 4  # bag lengths are uniform in [min_ids, max_ids]
    min_ids: int = 1
    zipf_alpha: float = 1.05
    effect_scale: float = 0.6  # std of the per-row effects
    interaction_rank: int = 4
    interaction_pairs: int = 4  # how many (f, g) feature pairs interact
    dense_scale: float = 0.5

    def __post_init__(self):
        for name in ("num_dense", "num_sparse", "rows", "max_ids", "interaction_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.min_ids <= self.max_ids:
            raise ValueError(f"synthetic min_ids must be in [0, max_ids], got {self.min_ids}")
        if self.zipf_alpha <= 0:
            raise ValueError(f"synthetic zipf_alpha must be > 0, got {self.zipf_alpha}")

    def embedding_config(self, dim: int, optimizer: SparseOptimizerSpec) -> EmbeddingConfig:
        tables = tuple(
            TableSpec(name=f"t{i}", rows=self.rows, dim=dim, optimizer=optimizer)
            for i in range(self.num_sparse)
        )
        features = tuple(
            FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=self.max_ids, pooling=Pooling.MEAN)
            for i in range(self.num_sparse)
        )
        return EmbeddingConfig(tables=tables, features=features)


class ZipfSampler:
    """Truncated Zipf(alpha) over [0, rows), with a fixed random permutation of the ranks."""

    def __init__(self, rows: int, alpha: float, rng: np.random.Generator):
        weights = np.arange(1, rows + 1, dtype=np.float64) ** (-alpha)
        self.cdf = np.cumsum(weights) / weights.sum()
        self.permutation = rng.permutation(rows)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, rng.random(size), side="left")
        return self.permutation[np.minimum(ranks, len(self.cdf) - 1)]


@dataclasses.dataclass
class SyntheticData:
    dense: np.ndarray  # [n, num_dense] float32
    sparse: dict[str, RaggedIds]
    labels: np.ndarray  # [n] float32
    true_logits: np.ndarray  # [n] float64, the planted model's logits

    def __len__(self) -> int:
        return len(self.labels)

    def examples(self) -> Examples:
        """The samples as host `Examples` (what `recsys.data` readers produce)."""
        return Examples(dense=self.dense, sparse=self.sparse, labels=self.labels)


class PlantedModel:
    def __init__(self, config: SyntheticConfig, seed: int):
        rng = np.random.default_rng([seed, 0])
        self.config = config
        self.samplers = [ZipfSampler(config.rows, config.zipf_alpha, rng) for _ in range(config.num_sparse)]
        self.effects = rng.normal(0, config.effect_scale, (config.num_sparse, config.rows))
        self.vectors = rng.normal(
            0, 1 / np.sqrt(config.interaction_rank), (config.num_sparse, config.rows, config.interaction_rank)
        )
        self.dense_weights = rng.normal(0, config.dense_scale, config.num_dense)
        pairs = [(f, g) for f in range(config.num_sparse) for g in range(f + 1, config.num_sparse)]
        chosen = (
            rng.choice(len(pairs), min(config.interaction_pairs, len(pairs)), replace=False) if pairs else []
        )
        self.pairs = [pairs[i] for i in sorted(chosen)]
        self.bias = -0.5

    def generate(self, n: int, seed: int) -> SyntheticData:
        """n samples; the same (model, n, seed) always gives the same data."""
        config = self.config
        rng = np.random.default_rng([seed, 1])
        dense = rng.normal(0, 1, (n, config.num_dense)).astype(np.float32)
        logits = self.bias + dense.astype(np.float64) @ self.dense_weights
        sparse, means = {}, []
        for f in range(config.num_sparse):
            lengths = rng.integers(config.min_ids, config.max_ids + 1, n)
            ids = self.samplers[f].sample(rng, int(lengths.sum()))
            sample = np.repeat(np.arange(n), lengths)
            counts = np.maximum(lengths, 1)[:, None]
            logits += np.bincount(sample, self.effects[f, ids], minlength=n) / counts[:, 0]
            vec = np.zeros((n, config.interaction_rank))
            np.add.at(vec, sample, self.vectors[f, ids])
            means.append(vec / counts)
            sparse[f"f{f}"] = RaggedIds(values=ids.astype(np.int64), lengths=lengths)
        for f, g in self.pairs:
            logits += np.sum(means[f] * means[g], axis=1)
        labels = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        return SyntheticData(dense, sparse, labels, logits)
