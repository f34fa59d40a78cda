"""The forward lookup over a sharded layout, under `jax.shard_map`.

Sharded groups route ids to their owners and results back with `all_to_all`s: by
broadcast to every shard of a table (`mesh.routing`) or, for row-sharded groups where it
sends fewer bytes, bucketized to the owners of each row (`mesh.bucketed`: rows back
unpooled, or pooled at the owner; the broadcast route is their overflow fallback).
Data-parallel groups are looked up locally. Owners gather with XLA, or through an
embedding-bag kernel per group (`bags`: the Pallas kernel on GPU and TPU, the CPU kernel
for pooled bags; `recsys.lookup.owner_bags`).
What each owner received is returned too, so the backward pass
(`mesh.sharded_update`) updates the same rows without routing the ids again. The routes
of a step are planned once (`plan_routes`) for both.

The lookup is two halves: `route_ids` sends the ids to their owners and reads only the
batch; `serve_routed` looks the rows up and sends the results back. `sharded_lookup` runs
both; a pipelined step (`recsys.training.pipeline`) routes the next batch's ids in the
step before.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mesh import bucketed, collectives, routing
from mesh.bucketed import BucketRoute
from mesh.routing import BagFn, FeatureRoute, GroupRoute, Route, RoutingOptions
from mesh.sharded import ShardedLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Received:
    """What one sharded group's owners received in the forward pass, for the backward.

    Broadcast route: `ids` (and `coef` if scaled), `[sources, local_batch, columns]`.
    Bucketized routes add `served` (`[sources, capacity]` rows served, `block_rows` on
    empty slots), this device's `owner` and `slot` of every id it sent, and `fallback`,
    whether the step took the broadcast route instead (a scalar, the same on every
    device); the pooled route adds each served slot's output position `at` and `weight`.
    Fields a route does not use are None.
    """

    ids: jax.Array | None = None
    coef: jax.Array | None = None
    served: jax.Array | None = None
    owner: jax.Array | None = None
    slot: jax.Array | None = None
    at: jax.Array | None = None
    weight: jax.Array | None = None
    fallback: jax.Array | None = None

    @staticmethod
    def specs(route: GroupRoute, bucket: BucketRoute | None, batch: P) -> Received:
        """The `shard_map` specs of what the group receives: per device, except the
        fallback verdict, which every device shares."""
        specs = {"ids": batch, "coef": batch if route.scaled else None}
        if bucket is not None:
            specs.update(served=batch, owner=batch, slot=batch, fallback=P())
            if bucket.pool_at_owner:
                specs.update(at=batch, weight=batch)
        return Received(**specs)


Routed = dict[str, Received]  # {sharded group: what its owners received}


@dataclasses.dataclass(frozen=True)
class StepRoutes:
    """How a step routes every sharded group, planned once for the forward and the backward."""

    broadcast: dict[str, GroupRoute]  # every sharded group some feature reads
    buckets: dict[str, BucketRoute]  # the groups that take a bucketized route (with fallback)
    features: Mapping[str, FeatureRoute]
    local_batch: int

    def specs(self, batch: P) -> dict[str, Received]:
        return {
            name: Received.specs(route, self.buckets.get(name), batch)
            for name, route in self.broadcast.items()
        }


def plan_routes(
    layout: ShardedLayout,
    features: Mapping[str, FeatureRoute],
    local_batch: int,
    options: RoutingOptions,
) -> StepRoutes:
    """Broadcast routes of every sharded group, and the bucketized routes chosen: per
    group, the one `options.route` forces where it applies, or (auto) the route that
    sends the fewest bytes in the step's codecs."""
    comm = {"comm": options.comm}
    routes = {k: dataclasses.replace(r, **comm) for k, r in routing.build_routes(layout, features).items()}
    step = functools.partial(StepRoutes, routes, features=features, local_batch=local_batch)
    if options.route == Route.BROADCAST:
        return step({})
    f = options.capacity_factor
    rows = bucketed.build_bucket_routes(layout, features, local_batch, f)
    pooled = bucketed.build_bucket_routes(layout, features, local_batch, f, broadcast=routes)
    rows, pooled = ({k: dataclasses.replace(b, **comm) for k, b in x.items()} for x in (rows, pooled))
    if options.route != Route.AUTO:
        return step(rows if options.route == Route.ROWS else pooled)
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
    return step(buckets)


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


def _route_broadcast(route: GroupRoute, ids, coef, device, axes) -> Received:
    received_ids, received_coef = routing.send_ids(route, ids, coef, axes, device)
    return Received(ids=received_ids, coef=received_coef)


def _serve_broadcast(route: GroupRoute, block, got: Received, device, axes, bag=None):
    rows, weight = routing.owner_rows(route, got.ids, got.coef, device)
    return routing.return_outputs(route, routing.pool(route, block, rows, weight, device, bag), axes)


def _route_bucketed(bucket: BucketRoute, route: GroupRoute, ids, coef, device, axes) -> Received:
    """Bucketized routing, plus the broadcast route's ids for the whole group when any
    device's buckets overflow this batch (the serve and the update then take that route).
    The buckets travel on every step, outside any `cond`, so the compiler can run their
    all-to-all beside compute (a pipelined step's update); on an overflowing step they
    arrive incomplete and read as empty, as the backward expects."""
    a = bucketed.assign(bucket, ids)
    fallback = collectives.any_device(a.overflow, axes)
    n, local_batch = bucket.group.devices, next(iter(ids.values())).shape[0]
    columns = (n, local_batch, route.columns)
    if bucket.pool_at_owner:
        served, at, weight = bucketed.send_slots(bucket, a, coef, ids, axes)
        at, weight = jnp.where(fallback, 0, at), jnp.where(fallback, 0.0, weight)
    else:
        served, at, weight = bucketed.send_rows(bucket, a, axes), None, None
    served = jnp.where(fallback, bucket.group.block_rows, served)

    def zeros(shape, dtype):
        return varying(jnp.zeros(shape, dtype), axes)

    def via_broadcast():
        return _route_broadcast(route, ids, coef, device, axes)

    def unused():
        return Received(
            ids=zeros(columns, jnp.int32), coef=zeros(columns, jnp.float32) if route.scaled else None
        )

    got = collectives.cond(fallback, via_broadcast, unused)
    return dataclasses.replace(
        got, served=served, at=at, weight=weight, owner=a.owner, slot=a.slot, fallback=fallback
    )


def _serve_bucketed(
    bucket: BucketRoute, route: GroupRoute, block, got: Received, ids, coef, device, axes, bag=None
):
    """The rows of what `_route_bucketed` sent, by the route it took."""
    local_batch = next(iter(ids.values())).shape[0]

    def via_buckets():
        if bucket.pool_at_owner:
            pooled = bucketed.pool_at_owner(bucket, block, got.served, got.at, got.weight, local_batch, bag)
            return routing.return_outputs(route, pooled, axes)
        values = bucketed.return_rows(bucket, block, got.served, axes, bag)
        return bucketed.pool_lanes(bucket, values, got.owner, got.slot, coef, ids)

    def via_broadcast():
        return _serve_broadcast(route, block, got, device, axes, bag)

    return collectives.cond(got.fallback, via_broadcast, via_buckets)


def route_ids(
    layout: ShardedLayout,
    routes: StepRoutes,
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
    order: jax.Array | None = None,
) -> tuple[Routed, jax.Array]:
    """The lookup's first half: every sharded group's ids (and coefficients) sent to
    their owners. It reads the batch only, never the tables, so a pipelined step routes
    the next batch's ids while its own compute runs (`serve_routed` finishes the lookup).
    Arguments as `sharded_lookup`'s. Returns (what each group's owners received, the
    order after these collectives)."""
    axes = tuple(mesh.axis_names)
    features = routes.features
    names = sorted(features)
    scaled = sorted(f for f in names if features[f].scaled)

    def body(ids, coef):
        d = collectives.device_index(axes)
        routed = {}
        for name, route in routes.broadcast.items():
            if name in routes.buckets:
                routed[name] = _route_bucketed(routes.buckets[name], route, ids, coef, d, axes)
            else:
                routed[name] = _route_broadcast(route, ids, coef, d, axes)
        return routed

    batch = P(axes)
    mapped = collectives.ordered_shard_map(
        body,
        mesh=mesh,
        in_specs=({f: batch for f in names}, {f: batch for f in scaled}),
        out_specs=routes.specs(batch),
    )
    order, routed = mapped(order, {f: ids[f] for f in names}, {f: coef[f] for f in scaled})
    return routed, order


def serve_routed(
    layout: ShardedLayout,
    storage: Mapping[str, jax.Array],
    routes: StepRoutes,
    routed: Routed,
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
    bags: Mapping[str, BagFn] | None = None,
    order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """The lookup's second half: the owners look up what `route_ids` sent them and send
    the results back; data-parallel groups are looked up locally. Returns (activations,
    the order after these collectives)."""
    axes = tuple(mesh.axis_names)
    bags = dict(bags or {})
    features = routes.features
    names = sorted(features)
    scaled = sorted(f for f in names if features[f].scaled)

    def body(storage, routed, ids, coef):
        d = collectives.device_index(axes)
        # The local lookup of data-parallel tables precedes the next collective, and so the
        # update that writes those tables after the gradients' gathers (semi_sync looks the
        # next batch up in the step that updates; unordered, XLA would copy the tables).
        acts = collectives.precede(_local_lookup(layout, storage, features, ids, coef, bags))
        for name, route in routes.broadcast.items():
            block, bag, got = storage[name][0], bags.get(name), routed[name]
            if name in routes.buckets:
                acts.update(_serve_bucketed(routes.buckets[name], route, block, got, ids, coef, d, axes, bag))
            else:
                acts.update(_serve_broadcast(route, block, got, d, axes, bag))
        return acts

    batch = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    mapped = collectives.ordered_shard_map(
        body,
        mesh=mesh,
        in_specs=(storage_specs, routes.specs(batch), {f: batch for f in names}, {f: batch for f in scaled}),
        out_specs={f: batch for f in names},
    )
    order, acts = mapped(
        order,
        {g.name: storage[g.name] for g in layout.groups},
        routed,
        {f: ids[f] for f in names},
        {f: coef[f] for f in scaled},
    )
    return acts, order


def sharded_lookup(
    layout: ShardedLayout,
    storage: Mapping[str, jax.Array],
    routes: StepRoutes,
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
    bags: Mapping[str, BagFn] | None = None,
    order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], Routed, jax.Array]:
    """Pooled (or per-position) activations of every feature, batch-sharded: `route_ids`
    then `serve_routed`.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      routes: the step's routes (`plan_routes`), which the backward takes too.
      ids: {feature: [batch, L] int32}, -1 on padding; batch sharded over all mesh axes.
      coef: {feature: [batch, L] float32} per-position factors of the scaled features.
      mesh: the mesh.
      bags: {group: embedding bag} for groups whose owners look up through a kernel
        (`mesh.routing.BagFn`); the others gather with XLA. Either way the activations
        are the same (up to float32 summation order).
      order: the order of the program's collectives so far (`collectives.ordered_shard_map`;
        None: the lookup starts it).
    Returns:
      ({feature: [batch, dim] or [batch, L, dim] float32}, what each group's owners
      received (for the update), the order after the lookup's collectives).
    """
    routed, order = route_ids(layout, routes, ids, coef, mesh, order)
    acts, order = serve_routed(layout, storage, routes, routed, ids, coef, mesh, bags, order)
    return acts, routed, order
