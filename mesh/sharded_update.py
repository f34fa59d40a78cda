"""The backward of the sharded lookup, under `jax.shard_map`: activation gradients to the
owners of the rows, each owner's update of its block handed in as a function.

Per stacked group (`mesh.sharded`), every owner ends up with the positions it served in
the forward pass, each as a row of its block and that position's weighted gradient:
- sharded groups: the gradients travel the way pooled results came back
  (`mesh.routing.send_gradients`) and meet the ids the owner received then (`Received`);
  on the bucketized routes (`mesh.bucketed`) to the slots the rows were served from, or,
  after an overflow, on the broadcast route, as the forward did;
- data-parallel groups: every device gathers the whole batch's positions and gradients
  of the group and applies the same update to its copy, which is what all-reducing the
  gradient would give.
Then `update(group, block, slots, rows, grads, exchange, step, device)` applies the
optimizer (`recsys.sharded_update` deduplicates, sums and updates the rows). Where a
table's rows are split into column shards, `exchange` completes a per-position partial
sum over the row's other shards (`mesh.routing.exchange_statistic`,
`mesh.bucketed.exchange_statistic`), for an optimizer whose statistic spans the whole
row (row-wise Adagrad); elsewhere it is None.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mesh import bucketed, collectives, routing
from mesh.sharded import GroupLayout, ShardedLayout
from mesh.sharded_lookup import Received, Routed, StepRoutes, local_rows

# (group, block [rows, width], its slots {name: [rows, ...]}, rows [n] of the block
# (`block_rows` where a position holds none), grads [n, width] float32, exchange or None,
# step, device index) -> (block, slots) updated in place.
OwnerUpdate = Callable[..., tuple[jax.Array, dict]]


def sharded_update(
    layout: ShardedLayout,
    mesh: jax.sharding.Mesh,
    storage: Mapping[str, jax.Array],
    slots: Mapping[str, dict],
    routes: StepRoutes,
    routed: Routed,
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    act_grads: Mapping[str, jax.Array],
    step: jax.Array,
    update: OwnerUpdate,
    *,
    order: jax.Array | None = None,
    check_vma: bool = True,
) -> tuple[dict[str, jax.Array], dict[str, dict], jax.Array]:
    """Applies `update` to every group's rows the batch touched, on their owners.

    Args:
      layout, storage, slots: the sharded groups and their optimizer slots (laid out alike).
      routes, routed: the step's routes and what the forward's owners received
        (`mesh.sharded_lookup`).
      ids, coef: the batch's ids (-1 on padding) and the scaled features' coefficients,
        as the forward took them; batch-sharded.
      act_grads: {feature: [batch, dim] or [batch, L, dim]}, batch-sharded.
      step: scalar int32, updates applied before this one.
      update: the owner's update (`OwnerUpdate`).
      order: the order of the step's collectives so far (`collectives.ordered_shard_map`).
      check_vma: False where `update` cannot keep the varying-axes check (Pallas kernels
        interpreted on CPU).
    Returns:
      (storage, slots) updated, sharded as given, and the order after the update.
    """
    axes = tuple(mesh.axis_names)
    local = _local_features(layout, routes)
    scaled = [f for f in local if f in coef]
    grad_features = sorted(act_grads)
    batch = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    slot_specs = {g.name: {k: g.partition_spec(axes) for k in slots[g.name]} for g in layout.groups}
    mapped = collectives.ordered_shard_map(
        functools.partial(_update_on_owners, layout, routes, local, update, axes),
        mesh=mesh,
        in_specs=(
            storage_specs,
            slot_specs,
            routes.specs(batch),
            {f: batch for f in local},
            {f: batch for f in scaled},
            {f: batch for f in grad_features},
            P(),
        ),
        out_specs=(storage_specs, slot_specs),
        check_vma=check_vma,
    )
    order, (storage, slots) = mapped(
        order,
        {g.name: storage[g.name] for g in layout.groups},
        {g.name: slots[g.name] for g in layout.groups},
        routed,
        {f: ids[f] for f in local},
        {f: coef[f] for f in scaled},
        {f: act_grads[f] for f in grad_features},
        jnp.asarray(step, jnp.int32),
    )
    return storage, slots, order


def _local_features(layout: ShardedLayout, routes: StepRoutes) -> list[str]:
    """Features whose ids the update reads on the batch owner: those of data-parallel groups
    and of the "rows" route (the other owners received all they need in the forward)."""
    rows_route = {name for name, b in routes.buckets.items() if not b.pool_at_owner}
    return sorted(
        f
        for f, r in routes.features.items()
        if layout.table_group(r.table).data_parallel or layout.group_of[r.table] in rows_route
    )


def _update_on_owners(
    layout, routes: StepRoutes, local, update, axes, storage, slots, routed, ids, coef, act_grads, step
):
    """The `shard_map` body: every group's update on this device."""
    device = collectives.device_index(axes)
    owner = functools.partial(update, step=step, device=device)
    features = routes.features
    new_storage, new_slots = dict(storage), dict(slots)
    for g in layout.groups:
        if g.data_parallel:
            names = [f for f in local if features[f].table in g.tables]
            if names:  # else no feature reads this group
                rows, grads = _data_parallel_positions(layout, g, names, features, ids, coef, act_grads, axes)
                new_storage[g.name], new_slots[g.name] = owner(
                    g, storage[g.name], slots[g.name], rows, grads, None
                )
        elif g.name in routes.broadcast:
            block, slot_block = storage[g.name][0], {k: v[0] for k, v in slots[g.name].items()}
            gradients = (routed[g.name], ids, coef, act_grads, axes, device)
            block, slot_block = _owner_update(routes, g.name, gradients, block, slot_block, owner)
            new_storage[g.name], new_slots[g.name] = block[None], {k: v[None] for k, v in slot_block.items()}
    return new_storage, new_slots


def _owner_update(routes: StepRoutes, name: str, gradients, block, slot_block, owner):
    """One sharded group's update on this owner: on its bucketized route, or on the
    broadcast route where it has none or the forward fell back to it."""
    received, ids, coef, act_grads, axes, device = gradients
    route = routes.broadcast[name]

    def broadcast(block, slot_block):
        rows, grads = _broadcast_positions(route, received, act_grads, device, axes)
        exchange = (
            functools.partial(routing.exchange_statistic, route, axes=axes) if route.column_split else None
        )
        return owner(route.group, block, slot_block, rows, grads, exchange)

    bucket = routes.buckets.get(name)
    if bucket is None:
        return broadcast(block, slot_block)

    def via_buckets(block, slot_block):
        if not bucket.pool_at_owner:  # "rows": each id's gradient to the slot its row came from
            grads = bucketed.send_gradients(bucket, act_grads, received.owner, received.slot, coef, ids, axes)
            return owner(route.group, block, slot_block, received.served, grads, None)
        grads = bucketed.slot_gradients(
            bucket, routing.send_gradients(route, act_grads, axes), received.at, received.weight
        )
        exchange = None
        if bucket.column_split:

            def exchange(partial):
                return bucketed.exchange_statistic(bucket, partial, received.owner, received.slot, axes)

        return owner(route.group, block, slot_block, received.served, grads, exchange)

    return collectives.cond(received.fallback, broadcast, via_buckets, block, slot_block)


def _broadcast_positions(route, received: Received, act_grads, device, axes):
    """Every position this owner served on the broadcast route: its block row
    (`[sources, local_batch, columns]`, `block_rows` where none) and weighted gradient."""
    grads = routing.send_gradients(route, act_grads, axes)
    rows, weight = routing.owner_rows(route, received.ids, received.coef, device)
    return rows, routing.position_gradients(route, grads, weight, device)


def _data_parallel_positions(layout, g: GroupLayout, names, features, ids, coef, act_grads, axes):
    """The whole batch's positions of a data-parallel group on every device: their rows
    ([n], `block_rows` on padding) and weighted gradients [n, width]."""
    rows, grads = [], []
    for f in names:
        r, weight = local_rows(layout, features[f].table, ids[f], coef.get(f))
        # Gather ids, weights and bag gradients; weigh positions after the gather, so a
        # bag's gradient travels once, not once per position.
        a = collectives.gather_batch(act_grads[f].astype(jnp.float32), axes)
        a = a[:, None, :] if features[f].pooled else a
        r = collectives.gather_batch(r, axes)
        weight = (
            collectives.gather_batch(weight, axes) if f in coef else (r < g.block_rows).astype(jnp.float32)
        )
        rows.append(r.reshape(-1))
        grads.append((weight[..., None] * a).reshape(-1, g.width))
    return jnp.concatenate(rows), jnp.concatenate(grads)
