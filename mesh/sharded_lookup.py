"""The forward lookup over a sharded layout, under `jax.shard_map`.

Sharded groups route ids to their owners and pooled results back (`mesh.routing`, two
`all_to_all`s per group); data-parallel groups are looked up locally. The ids each owner
received are returned too, so the backward pass (`recsys.sharded_update`) updates the
same rows without routing the ids again.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mesh import collectives, routing
from mesh.routing import FeatureRoute
from mesh.sharded import ShardedLayout

Routed = dict[str, dict[str, jax.Array]]  # {group: {"ids": ..., "coef": ...}} as owners received them


def local_rows(layout: ShardedLayout, table: str, ids: jax.Array, coef: jax.Array | None):
    """A data-parallel table's rows in its group stack, and each position's weight
    (`ids` -1 on padding -> the stack's size and weight 0)."""
    g = layout.table_group(table)
    (p,) = g.placements_of(table)
    valid = ids >= 0
    rows = jnp.where(valid, p.offset + ids, g.block_rows)
    weight = valid.astype(jnp.float32) if coef is None else jnp.where(valid, coef, 0.0)
    return rows, weight


def sharded_lookup(
    layout: ShardedLayout,
    storage: Mapping[str, jax.Array],
    features: Mapping[str, FeatureRoute],
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
) -> tuple[dict[str, jax.Array], Routed]:
    """Pooled (or per-position) activations of every feature, batch-sharded.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      features: {feature: FeatureRoute}.
      ids: {feature: [batch, L] int32}, -1 on padding; batch sharded over all mesh axes.
      coef: {feature: [batch, L] float32} per-position factors of the scaled features.
      mesh: the mesh.
    Returns:
      ({feature: [batch, dim] or [batch, L, dim] float32}, routed ids for the update).
    """
    axes = tuple(mesh.axis_names)
    routes = routing.build_routes(layout, features)
    names = sorted(features)
    scaled = sorted(f for f in names if features[f].scaled)

    def body(storage, ids, coef):
        d = collectives.device_index(axes)
        acts, routed = {}, {}
        for f in names:
            r = features[f]
            g = layout.table_group(r.table)
            if not g.data_parallel:
                continue
            rows, weight = local_rows(layout, r.table, ids[f], coef.get(f))
            values = storage[g.name].at[rows].get(mode="fill", fill_value=0).astype(jnp.float32)
            values = values * weight[..., None]
            acts[f] = values.sum(axis=1) if r.pooled else values
        for name, route in routes.items():
            received_ids, received_coef = routing.send_ids(route, ids, coef, axes)
            rows, weight = routing.owner_rows(route, received_ids, received_coef, d)
            pooled = routing.pool(route, storage[name][0], rows, weight, d)
            acts.update(routing.return_outputs(route, pooled, axes))
            routed[name] = {"ids": received_ids}
            if received_coef is not None:
                routed[name]["coef"] = received_coef
        return acts, routed

    batch = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    routed_specs = {
        name: {"ids": batch, **({"coef": batch} if route.scaled else {})} for name, route in routes.items()
    }
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(storage_specs, {f: batch for f in names}, {f: batch for f in scaled}),
        out_specs=({f: batch for f in names}, routed_specs),
    )
    return mapped(
        {g.name: storage[g.name] for g in layout.groups},
        {f: ids[f] for f in names},
        {f: coef[f] for f in scaled},
    )
