"""The forward lookup over a sharded layout, under `jax.shard_map`.

Sharded groups route ids to their owners and results back with `all_to_all`s: by
broadcast to every shard of a table (`mesh.routing`) or, for row-wise groups where it
sends fewer bytes, bucketized to the one owner of each row (`mesh.bucketed`, with the
broadcast route as its overflow fallback). Data-parallel groups are looked up locally.
What each owner received is returned too, so the backward pass
(`recsys.sharded_update`) updates the same rows without routing the ids again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mesh import bucketed, collectives, routing
from mesh.bucketed import BucketRoute
from mesh.routing import FeatureRoute, GroupRoute
from mesh.sharded import ShardedLayout

# {group: {"ids", "coef": broadcast route; "served", "owner", "slot", "fallback": bucketized}}
Routed = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    """How row-wise groups route ids (`mesh.bucketed`).

    bucketize: "auto" picks, per group, the route that sends fewer bytes; "always" and
      "never" force bucketized or broadcast routing.
    capacity_factor: slots per peer, as a multiple of the ids a peer expects when ids
      spread like rows. A step that needs more falls back to broadcast routing.
    """

    bucketize: str = "auto"
    capacity_factor: float = 2.0

    def __post_init__(self):
        if self.bucketize not in ("auto", "always", "never"):
            raise ValueError(f"bucketize must be auto, always or never, got {self.bucketize!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")


def plan_routes(
    layout: ShardedLayout,
    features: Mapping[str, FeatureRoute],
    local_batch: int,
    options: RoutingOptions,
) -> tuple[dict[str, GroupRoute], dict[str, BucketRoute]]:
    """Broadcast routes of every sharded group, and the bucketized routes chosen."""
    routes = routing.build_routes(layout, features)
    buckets = bucketed.build_bucket_routes(layout, features, local_batch, options.capacity_factor)
    if options.bucketize == "never":
        return routes, {}
    if options.bucketize == "auto":
        n = layout.groups[0].devices
        buckets = {
            g: b
            for g, b in buckets.items()
            if bucketed.bucket_bytes(b, n) < routing.broadcast_bytes(routes[g], local_batch, n)
        }
    return routes, buckets


def varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Marks a value made inside `shard_map` as per-device, so `lax.cond` branches agree."""
    return jax.lax.pcast(x, axes, to="varying")


def local_rows(layout: ShardedLayout, table: str, ids: jax.Array, coef: jax.Array | None):
    """A data-parallel table's rows in its group stack, and each position's weight
    (`ids` -1 on padding -> the stack's size and weight 0)."""
    g = layout.table_group(table)
    (p,) = g.placements_of(table)
    valid = ids >= 0
    rows = jnp.where(valid, p.offset + ids, g.block_rows)
    weight = valid.astype(jnp.float32) if coef is None else jnp.where(valid, coef, 0.0)
    return rows, weight


def _broadcast_forward(route: GroupRoute, block, ids, coef, device, axes):
    received_ids, received_coef = routing.send_ids(route, ids, coef, axes)
    rows, weight = routing.owner_rows(route, received_ids, received_coef, device)
    pooled = routing.pool(route, block, rows, weight, device)
    out = {"ids": received_ids}
    if received_coef is not None:
        out["coef"] = received_coef
    return routing.return_outputs(route, pooled, axes), out


def _bucketed_forward(bucket: BucketRoute, route: GroupRoute, block, ids, coef, device, axes):
    """Bucketized routing, or the broadcast route for the whole group when any device's
    buckets overflow this step."""
    owner, slot, row, overflow = bucketed.assign(bucket, ids)
    fallback = collectives.any_device(overflow, axes)
    n, local_batch = bucket.group.devices, next(iter(ids.values())).shape[0]
    broadcast_shapes = {"ids": ((n, local_batch, route.columns), jnp.int32)}
    if route.scaled:
        broadcast_shapes["coef"] = ((n, local_batch, route.columns), jnp.float32)

    def via_buckets():
        served, values = bucketed.exchange_rows(bucket, block, owner, slot, row, axes)
        unused = {k: varying(jnp.zeros(shape, dtype), axes) for k, (shape, dtype) in broadcast_shapes.items()}
        return bucketed.pool_lanes(bucket, values, owner, slot, coef, ids), served, unused

    def via_broadcast():
        acts, out = _broadcast_forward(route, block, ids, coef, device, axes)
        unserved = jnp.full((n, bucket.capacity), bucket.group.block_rows, jnp.int32)
        return acts, varying(unserved, axes), out

    acts, served, out = jax.lax.cond(fallback, via_broadcast, via_buckets)
    return acts, {**out, "served": served, "owner": owner, "slot": slot, "fallback": fallback[None]}


def sharded_lookup(
    layout: ShardedLayout,
    storage: Mapping[str, jax.Array],
    features: Mapping[str, FeatureRoute],
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
    options: RoutingOptions | None = None,
) -> tuple[dict[str, jax.Array], Routed]:
    """Pooled (or per-position) activations of every feature, batch-sharded.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      features: {feature: FeatureRoute}.
      ids: {feature: [batch, L] int32}, -1 on padding; batch sharded over all mesh axes.
      coef: {feature: [batch, L] float32} per-position factors of the scaled features.
      mesh: the mesh.
      options: how row-wise groups route.
    Returns:
      ({feature: [batch, dim] or [batch, L, dim] float32}, routed ids for the update).
    """
    axes = tuple(mesh.axis_names)
    options = options or RoutingOptions()
    names = sorted(features)
    local_batch = ids[names[0]].shape[0] // mesh.devices.size
    routes, buckets = plan_routes(layout, features, local_batch, options)
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
            block = storage[name][0]
            if name in buckets:
                acts_g, routed[name] = _bucketed_forward(buckets[name], route, block, ids, coef, d, axes)
            else:
                acts_g, routed[name] = _broadcast_forward(route, block, ids, coef, d, axes)
            acts.update(acts_g)
        return acts, routed

    batch = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    routed_specs = {}
    for name, route in routes.items():
        routed_specs[name] = {"ids": batch, **({"coef": batch} if route.scaled else {})}
        if name in buckets:
            routed_specs[name].update(served=batch, owner=batch, slot=batch, fallback=batch)
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
