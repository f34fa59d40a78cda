"""Recommendation-model training in JAX with embedding tables sharded over a device mesh.

What a user's own loop needs, on one device or many: specs, jagged batches, the
embedding collection for a Flax NNX model, the trainers and checkpoints, and the mesh,
plan and planner of the sharded path. Importing `recsys` changes nothing process-wide;
on a CPU-only host, `tune_host_malloc()` (called first) keeps XLA:CPU's per-step buffers
mapped (`recsys.host_malloc`).
"""

from mesh import MeshSpec, ShardingPlan, Strategy, make_mesh, mesh_spec, plan_for_strategy
from mesh.meshes import simulate_cpu_devices
from mesh.routing import RoutingOptions
from recsys.batching import Batch, process_share, to_batch
from recsys.cache import CacheConfig, CachedTrainer, ShardedCachedTrainer
from recsys.embedding import EmbeddingCollection, EmbeddingTable
from recsys.host_malloc import tune as tune_host_malloc
from recsys.lookup import Activations, init_tables, lookup, reference_lookup, stack_tables, unstack_tables
from recsys.planning import plan_model, table_loads
from recsys.sparse import InputPolicy, JaggedBatch, JaggedFeature, PackReport, RaggedIds, pack_batch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import (
    EmbeddingConfig,
    FeatureSpec,
    InitializerSpec,
    LRSchedule,
    Pooling,
    SparseOptimizerSpec,
    TableSpec,
)
from recsys.training import (
    Checkpointer,
    CheckpointMismatch,
    ShardedState,
    ShardedTrainer,
    Trainer,
    TrainState,
    binary_cross_entropy,
)

__all__ = [
    "CacheConfig",
    "CachedTrainer",
    "ShardedCachedTrainer",
    "Activations",
    "Batch",
    "CheckpointMismatch",
    "Checkpointer",
    "EmbeddingCollection",
    "EmbeddingConfig",
    "EmbeddingTable",
    "FeatureSpec",
    "InitializerSpec",
    "InputPolicy",
    "JaggedBatch",
    "JaggedFeature",
    "LRSchedule",
    "MeshSpec",
    "PackReport",
    "Pooling",
    "RaggedIds",
    "RoutingOptions",
    "ShardedState",
    "ShardedTrainer",
    "ShardingPlan",
    "SparseOptimizerSpec",
    "Strategy",
    "TableSpec",
    "TrainState",
    "Trainer",
    "binary_cross_entropy",
    "init_slots",
    "init_tables",
    "lookup",
    "make_mesh",
    "mesh_spec",
    "pack_batch",
    "plan_for_strategy",
    "plan_model",
    "process_share",
    "reference_lookup",
    "simulate_cpu_devices",
    "sparse_update",
    "stack_tables",
    "table_loads",
    "to_batch",
    "tune_host_malloc",
    "unstack_tables",
]
