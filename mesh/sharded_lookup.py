"""The forward lookup over a sharded layout, under `jax.shard_map`.

Sharded groups route ids to their owners and results back with `all_to_all`s: by
broadcast to every shard of a table (`mesh.routing`) or, for row-sharded groups where it
sends fewer bytes, bucketized to the owners of each row (`mesh.bucketed`: rows back
unpooled, or pooled at the owner; the broadcast route is their overflow fallback).
Data-parallel groups are looked up locally. Owners gather with XLA, or through an
embedding-bag kernel per group (`bags`: the Pallas kernel on GPU and TPU, the CPU kernel
for pooled bags; `recsys.lookup.owner_bags`).
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
from mesh.collectives import CommConfig
from mesh.routing import BagFn, FeatureRoute, GroupRoute
from mesh.sharded import ShardedLayout

ROUTES = ("auto", "broadcast", "rows", "pooled")

# {group: {"ids", "coef": broadcast route; "served", "owner", "slot", "fallback": bucketized;
#  "at", "weight": pooled at the owner}}
Routed = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    """How row-sharded groups route ids (`mesh.routing`, `mesh.bucketed`).

    route: "auto" picks, per group, the route that sends the fewest bytes; "broadcast",
      "rows" and "pooled" force one where it applies (rows: whole-row groups; pooled:
      groups read only by pooled features), the broadcast route elsewhere.
    capacity_factor: slots per peer on the bucketized routes, as a multiple of the ids a
      peer expects when ids spread like rows. A step that needs more falls back to the
      broadcast route.
    comm: the codecs of the pooled results (fwd), their gradients (bwd) and the ids; the
      pooled route's results travel like the broadcast route's. Route choice counts their
      bytes on the wire.
    """

    route: str = "auto"
    capacity_factor: float = 2.0
    comm: CommConfig = CommConfig()

    def __post_init__(self):
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")


def plan_routes(
    layout: ShardedLayout,
    features: Mapping[str, FeatureRoute],
    local_batch: int,
    options: RoutingOptions,
) -> tuple[dict[str, GroupRoute], dict[str, BucketRoute]]:
    """Broadcast routes of every sharded group, and the bucketized routes chosen."""
    codecs = {"forward": options.comm.fwd, "backward": options.comm.bwd, "ids": options.comm.ids}
    routes = {k: dataclasses.replace(r, **codecs) for k, r in routing.build_routes(layout, features).items()}
    if options.route == "broadcast":
        return routes, {}
    f = options.capacity_factor
    rows = bucketed.build_bucket_routes(layout, features, local_batch, f)
    rows = {k: dataclasses.replace(b, **codecs) for k, b in rows.items()}
    pooled = bucketed.build_bucket_routes(layout, features, local_batch, f, broadcast=routes)
    if options.route != "auto":
        return routes, rows if options.route == "rows" else pooled
    n = layout.groups[0].devices
    buckets = {}
    for name, route in routes.items():
        sent = {None: routing.broadcast_bytes(route, local_batch, n)}
        for bucket in (rows.get(name), pooled.get(name)):
            if bucket is not None:
                sent[bucket] = bucketed.bucket_bytes(bucket, n, local_batch)
        best = min(sent, key=lambda b: (sent[b], b is not None))
        if best is not None:
            buckets[name] = best
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


def _pad_to(x: jax.Array, width: int) -> jax.Array:
    """[batch, L] -> [batch, width] with zeros after (ids of row 0 with weight 0)."""
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])))


def _local_lookup(layout: ShardedLayout, storage, features, ids, coef, bags) -> dict[str, jax.Array]:
    """Activations of the features of data-parallel groups, from this device's replica: one
    bag call per group and pooling mode when the group has a kernel (bags padded to the
    longest), else an XLA gather per feature."""
    acts, by_call = {}, {}
    for f in sorted(features):
        r = features[f]
        g = layout.table_group(r.table)
        if not g.data_parallel:
            continue
        rows, weight = local_rows(layout, r.table, ids[f], coef.get(f))
        if g.name in bags:
            by_call.setdefault((g.name, r.pooled), []).append((f, rows, weight))
            continue
        values = storage[g.name].at[rows].get(mode="fill", fill_value=0).astype(jnp.float32)
        values = values * weight[..., None]
        acts[f] = values.sum(axis=1) if r.pooled else values
    for (group, pooled), members in by_call.items():
        width = max(rows.shape[1] for _, rows, _ in members)
        bag_ids = jnp.stack([_pad_to(jnp.where(w != 0, rows, 0), width) for _, rows, w in members])
        bag_coef = jnp.stack([_pad_to(w, width) for _, _, w in members])
        out = bags[group](storage[group], bag_ids, bag_coef, pooled)  # [batch, features, ...]
        for i, (f, rows, _) in enumerate(members):
            acts[f] = out[:, i] if pooled else out[:, i, : rows.shape[1]]
    return acts


def _broadcast_forward(route: GroupRoute, block, ids, coef, device, axes, bag=None):
    received_ids, received_coef = routing.send_ids(route, ids, coef, axes, device)
    rows, weight = routing.owner_rows(route, received_ids, received_coef, device)
    pooled = routing.pool(route, block, rows, weight, device, bag)
    out = {"ids": received_ids}
    if received_coef is not None:
        out["coef"] = received_coef
    return routing.return_outputs(route, pooled, axes), out


def _bucketed_forward(bucket: BucketRoute, route: GroupRoute, block, ids, coef, device, axes, bag=None):
    """Bucketized routing, or the broadcast route for the whole group when any device's
    buckets overflow this step."""
    a = bucketed.assign(bucket, ids)
    fallback = collectives.any_device(a.overflow, axes)
    n, local_batch = bucket.group.devices, next(iter(ids.values())).shape[0]
    broadcast_shapes = {"ids": ((n, local_batch, route.columns), jnp.int32)}
    if route.scaled:
        broadcast_shapes["coef"] = ((n, local_batch, route.columns), jnp.float32)
    slots = (n, bucket.capacity)
    bucket_shapes = {"served": (slots, jnp.int32)}
    if bucket.pool_at_owner:
        bucket_shapes.update(at=(slots, jnp.int32), weight=(slots, jnp.float32))

    def unused(shapes):
        return {k: varying(jnp.zeros(shape, dtype), axes) for k, (shape, dtype) in shapes.items()}

    def via_buckets():
        if bucket.pool_at_owner:
            served, at, weight = bucketed.send_slots(bucket, a, coef, ids, axes)
            pooled = bucketed.pool_at_owner(bucket, block, served, at, weight, local_batch, bag)
            acts = routing.return_outputs(route, pooled, axes)
            return acts, {"served": served, "at": at, "weight": weight, **unused(broadcast_shapes)}
        served, values = bucketed.exchange_rows(bucket, block, a, axes, bag)
        return bucketed.pool_lanes(bucket, values, a, coef, ids), {
            "served": served,
            **unused(broadcast_shapes),
        }

    def via_broadcast():
        acts, out = _broadcast_forward(route, block, ids, coef, device, axes, bag)
        empty = unused(bucket_shapes)
        empty["served"] = varying(jnp.full(slots, bucket.group.block_rows, jnp.int32), axes)
        return acts, {**out, **empty}

    acts, out = collectives.cond(fallback, via_broadcast, via_buckets)
    return acts, {**out, "owner": a.owner, "slot": a.slot, "fallback": fallback}


def sharded_lookup(
    layout: ShardedLayout,
    storage: Mapping[str, jax.Array],
    features: Mapping[str, FeatureRoute],
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
    options: RoutingOptions | None = None,
    bags: Mapping[str, BagFn] | None = None,
    order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], Routed, jax.Array]:
    """Pooled (or per-position) activations of every feature, batch-sharded.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      features: {feature: FeatureRoute}.
      ids: {feature: [batch, L] int32}, -1 on padding; batch sharded over all mesh axes.
      coef: {feature: [batch, L] float32} per-position factors of the scaled features.
      mesh: the mesh.
      options: how row-wise groups route.
      bags: {group: embedding bag} for groups whose owners look up through a kernel
        (`mesh.routing.BagFn`); the others gather with XLA. Either way the activations
        are the same (up to float32 summation order).
      order: the order of the program's collectives so far (`collectives.ordered_shard_map`;
        None: the lookup starts it).
    Returns:
      ({feature: [batch, dim] or [batch, L, dim] float32}, routed ids for the update, the
      order after the lookup's collectives).
    """
    axes = tuple(mesh.axis_names)
    options = options or RoutingOptions()
    bags = dict(bags or {})
    names = sorted(features)
    local_batch = ids[names[0]].shape[0] // mesh.devices.size
    routes, buckets = plan_routes(layout, features, local_batch, options)
    scaled = sorted(f for f in names if features[f].scaled)

    def body(storage, ids, coef):
        d = collectives.device_index(axes)
        acts, routed = _local_lookup(layout, storage, features, ids, coef, bags), {}
        for name, route in routes.items():
            block, bag = storage[name][0], bags.get(name)
            if name in buckets:
                acts_g, routed[name] = _bucketed_forward(buckets[name], route, block, ids, coef, d, axes, bag)
            else:
                acts_g, routed[name] = _broadcast_forward(route, block, ids, coef, d, axes, bag)
            acts.update(acts_g)
        return acts, routed

    batch = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    routed_specs = {}
    for name, route in routes.items():
        routed_specs[name] = {"ids": batch, **({"coef": batch} if route.scaled else {})}
        if name in buckets:
            # The fallback verdict is the same on every device (`collectives.any_device`).
            routed_specs[name].update(served=batch, owner=batch, slot=batch, fallback=P())
            if buckets[name].pool_at_owner:
                routed_specs[name].update(at=batch, weight=batch)
    mapped = collectives.ordered_shard_map(
        body,
        mesh=mesh,
        in_specs=(storage_specs, {f: batch for f in names}, {f: batch for f in scaled}),
        out_specs=({f: batch for f in names}, routed_specs),
    )
    order, (acts, routed) = mapped(
        order,
        {g.name: storage[g.name] for g in layout.groups},
        {f: ids[f] for f in names},
        {f: coef[f] for f in scaled},
    )
    return acts, routed, order
