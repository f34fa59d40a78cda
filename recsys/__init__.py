"""Recommendation-model training in JAX: specs, jagged batches, embedding lookups, sparse
optimizers, models and the split train step."""

# First, before any JAX computation can start XLA's worker threads: glibc malloc settings
# that keep XLA:CPU's per-step buffers mapped (`recsys.host_malloc`).
from recsys import host_malloc  # noqa: F401  (imported for its effect)
from recsys.embedding import EmbeddingCollection, EmbeddingTable
from recsys.lookup import Activations, init_tables, lookup, reference_lookup, stack_tables, unstack_tables
from recsys.sparse import InputPolicy, JaggedBatch, JaggedFeature, PackReport, RaggedIds, pack_batch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import (
    EmbeddingConfig,
    FeatureSpec,
    InitializerSpec,
    Pooling,
    SparseOptimizerSpec,
    TableSpec,
)
from recsys.trainer import Batch, Trainer, TrainState

__all__ = [
    "Batch",
    "Activations",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "EmbeddingTable",
    "FeatureSpec",
    "InitializerSpec",
    "InputPolicy",
    "JaggedBatch",
    "JaggedFeature",
    "PackReport",
    "Pooling",
    "RaggedIds",
    "SparseOptimizerSpec",
    "TableSpec",
    "TrainState",
    "Trainer",
    "init_slots",
    "init_tables",
    "lookup",
    "pack_batch",
    "reference_lookup",
    "sparse_update",
    "stack_tables",
    "unstack_tables",
]
