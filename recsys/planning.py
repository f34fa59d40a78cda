"""Planning a model's tables for a mesh with the cost-model planner (`mesh.planner`).

The planner knows tables only as `TableLoad`s (sizes, bytes, ids per sample); this
module describes a model's `EmbeddingConfig` that way and plans it for a mesh:

    plan = plan_model(config, mesh, batch_size=4096, mean_ids={"f0": 1.0, ...}).plan
    trainer = ShardedTrainer(build_model, optax.adam(1e-3), plan, mesh)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from mesh.cache_plan import HitRate, plan_with_cache
from mesh.cost import TableLoad, activation_bytes
from mesh.meshes import mesh_spec
from mesh.planner import PlanResult, plan_tables, topology_for_mesh
from mesh.routing import RoutingOptions
from mesh.topology import Topology
from recsys.specs import EmbeddingConfig, Pooling


def table_loads(config: EmbeddingConfig, mean_ids: Mapping[str, float] | None = None) -> list[TableLoad]:
    """What the planner needs of each table: its specs and, per feature reading it, the
    average ids per sample (`mean_ids`; a feature left out counts as full, `max_ids`)."""
    mean_ids = mean_ids or {}
    loads = []
    for t in config.tables:
        features = [f for f in config.features if f.table == t.name]
        loads.append(
            TableLoad(
                name=t.name,
                rows=t.rows,
                dim=t.dim,
                ids_per_sample=sum(mean_ids.get(f.name, f.max_ids) for f in features),
                bag_width=sum(f.max_ids for f in features),
                element_bytes=np.dtype(t.dtype).itemsize,
                state_bytes=np.dtype(t.optimizer.state_dtype).itemsize,
                optimizer=t.optimizer.kind,
                scaled=any(f.weighted or f.pooling is Pooling.MEAN for f in features),
                outputs=sum(1 if f.pooling is not Pooling.NONE else f.max_ids for f in features),
                sequence=any(f.pooling is Pooling.NONE for f in features),
            )
        )
    return loads


def plan_model(
    config: EmbeddingConfig,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    *,
    mean_ids: Mapping[str, float] | None = None,
    topology: Topology | None = None,
    routing: RoutingOptions | None = None,
    max_moves: int | None = 200,
    device_memory: float | None = None,
    hit_rate: HitRate | None = None,
) -> PlanResult:
    """The planner's plan for `config`'s tables on `mesh` at global batch `batch_size`.

    Args:
      mean_ids: {feature: average ids per sample} (default: every bag full).
      topology: memory and bandwidths to plan with (`python -m mesh.plan --calibrate`
        prints one for these devices); hosts and devices come from the mesh. Default:
        the platform's preset, with the memory the devices report.
      routing: the routing options (codecs, bucket capacity) the step will use.
      max_moves: a cap on the refinement's moves rather than a time budget, so every
        process of a multi-process run plans the same.
      device_memory: bytes per device to plan for, in place of the topology's.
      hit_rate: (table, cache factor) -> expected hit rate (`recsys.cache.HitRateEstimate`):
        tables that do not fit may be cached over host memory (`mesh.cache_plan`).
    Device memory counts the tables (or their caches), the exchanges' buffers and the
    batch's embedding activations (`mesh.cost.activation_bytes`).
    """
    device = mesh.devices.reshape(-1)[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    topo = topology_for_mesh(mesh_spec(mesh), device.platform, (stats or {}).get("bytes_limit"), topology)
    if device_memory is not None:
        topo = dataclasses.replace(topo, memory=float(device_memory))
    loads = table_loads(config, mean_ids)
    options = dict(
        routing=routing, max_moves=max_moves, reserved_bytes=activation_bytes(loads, batch_size, topo.devices)
    )
    if hit_rate is None:
        return plan_tables(loads, topo, batch_size, **options)
    return plan_with_cache(loads, topo, batch_size, hit_rate, **options)
