"""Training batches: what a train step takes, and how host examples become one.

A `Batch` holds the dense features, the packed sparse bags, the labels and, optionally,
per-sample loss weights and extra targets (multi-task, retrieval). `to_batch` packs a
block of host `Examples` (`recsys.data`) into one, in NumPy; a trainer's `place_batch`
puts it on its device or shards it over its mesh.

    for examples, _ in recsys.data.train_batches(dataset, 256, seed=0):
        state, loss = trainer.train_step(state, trainer.place_batch(to_batch(config, examples)))
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from recsys.data.examples import Examples
from recsys.sparse import InputPolicy, JaggedBatch, PackReport, pack_batch
from recsys.specs import EmbeddingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    dense: jax.Array  # [batch, dense_features] float32
    sparse: JaggedBatch
    labels: jax.Array  # [batch] (or [batch, ...]): what the loss compares the outputs with
    weights: jax.Array | None = None  # [batch] float32 per-sample loss weights; None: all 1
    targets: dict = dataclasses.field(default_factory=dict)  # {name: [batch, ...]} extra targets


def to_batch(
    config: EmbeddingConfig,
    examples: Examples,
    policy: InputPolicy | None = None,
    report: PackReport | None = None,
) -> Batch:
    """Packs host examples into a `Batch` of NumPy arrays (`recsys.sparse.pack_batch`:
    ids out of range or bags longer than a feature's `max_ids` raise unless `policy`
    rewrites them, counted in `report`)."""
    sparse = pack_batch(config, examples.sparse, policy or InputPolicy(), report)
    return Batch(dense=np.asarray(examples.dense), sparse=sparse, labels=np.asarray(examples.labels))


def process_share(examples: Examples) -> Examples:
    """This process's share of a global batch (its devices' samples, in process order):
    with several processes, each packs and transfers only its own samples."""
    processes = jax.process_count()
    if processes == 1:
        return examples
    share = len(examples) // processes
    return examples.slice(jax.process_index() * share, (jax.process_index() + 1) * share)
