"""Bucketized routing for row-sharded groups: each id travels to the one owner of its row.

`mesh.routing` sends a feature's ids to every row shard of its table and gets a pooled
partial back from each, which costs `owners x (ids + one pooled vector)` per sample.
Here every id goes only to the device that holds its row, and the row comes back
unpooled, which costs `capacity_factor x (ids + one vector per id)` per sample: less
whenever a feature has fewer ids per sample than its table has row shards (the usual
row-wise case: pooling 1-10 over 8-1024 devices).

Static shapes need a fixed number of slots per peer: `capacity = capacity_factor x` the
most ids any owner expects from one source if ids were spread like its rows. Skewed
batches can need more. Every device computes whether any of its buckets overflowed, one
`psum` makes the verdict global, and the whole group then takes the broadcast route for
that step (`lax.cond`), so an id is never dropped; the step reports the fallback.

Forward, inside `jax.shard_map`, for one group:
1. `assign`: per id, its owner, its row in the owner's block and its slot among the ids
   this device sends that owner (rank by a stable sort).
2. `exchange_rows`: `[owners, capacity]` block rows out, `[owners, capacity, width]`
   values back (two `all_to_all`s); `gather_slots` picks each id's row.
3. `pool_lanes`: the batch owner weighs and pools (or keeps) the rows per feature.
Backward: `send_gradients` weighs each id's bag gradient and sends it to the slot its
row came from; the owner updates the rows it served.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mesh import collectives
from mesh.plan import Strategy
from mesh.sharded import GroupLayout, ShardedLayout

_ROW_SHARDED = (Strategy.ROW_WISE, Strategy.TABLE_ROW_WISE, Strategy.GRID)


def bucketizable(layout: ShardedLayout, g: GroupLayout) -> bool:
    """Row-sharded groups whose rows are whole on their owners (a grid of one column
    shard, e.g. on one host). Column shards would need row-wise statistics across owners,
    which the broadcast route provides (`mesh.routing.full_row_mean_square`)."""
    return g.strategy in _ROW_SHARDED and all(layout.table_shapes[t][1] == g.width for t in g.tables)


@dataclasses.dataclass(frozen=True)
class Lane:
    """One feature's ids and which device owns each row of its table."""

    feature: str
    cols: tuple[int, int]  # the whole dim: bucketized tables have no column shards
    ids: int  # ids per sample
    pooled: bool
    starts: tuple[int, ...]  # first row of each row shard, ascending
    devices: tuple[int, ...]
    offsets: tuple[int, ...]  # where each shard starts in its owner's block


@dataclasses.dataclass(frozen=True)
class BucketRoute:
    group: GroupLayout
    features: tuple[str, ...]
    lanes: tuple[Lane, ...]
    capacity: int  # slots per (source, owner) pair
    positions: int  # ids one device sends per step: local_batch x sum of lane ids


def build_bucket_routes(
    layout: ShardedLayout, features, local_batch: int, capacity_factor: float
) -> dict[str, BucketRoute]:
    """{group: BucketRoute} for every bucketizable group some feature reads."""
    routes = {}
    for g in layout.groups:
        names = sorted(f for f, r in features.items() if layout.group_of[r.table] == g.name)
        if not bucketizable(layout, g) or not names:
            continue
        lanes, expected = [], np.zeros(g.devices)
        for f in names:
            r = features[f]
            rows = layout.table_shapes[r.table][0]
            shards = sorted(g.placements_of(r.table), key=lambda p: p.rows)
            lanes.append(
                Lane(
                    f,
                    shards[0].cols,
                    r.ids_per_sample,
                    r.pooled,
                    tuple(p.rows[0] for p in shards),
                    tuple(p.device for p in shards),
                    tuple(p.offset for p in shards),
                )
            )
            for p in shards:  # ids spread like rows: the share of ids each owner expects
                expected[p.device] += local_batch * r.ids_per_sample * p.row_count / rows
        positions = local_batch * sum(lane.ids for lane in lanes)
        capacity = min(positions, max(1, math.ceil(capacity_factor * expected.max())))
        routes[g.name] = BucketRoute(g, tuple(names), tuple(lanes), capacity, positions)
    return routes


def bucket_bytes(route: BucketRoute, devices: int) -> int:
    """Bytes one device sends per step on this route: ids out, rows back, gradients out."""
    slots = devices * route.capacity * (devices - 1) // devices
    return slots * 4 + 2 * slots * route.group.width * 4


def assign(route: BucketRoute, ids: Mapping[str, jax.Array]):
    """Step 1 for this device's ids ({feature: [local_batch, L], -1 on padding}).

    Returns:
      owner: [positions] int32 owner device of every id (`devices` for padding).
      slot: [positions] int32 its slot among the ids sent to that owner.
      row: [positions] int32 its row in the owner's block.
      overflow: bool, some owner gets more than `capacity` ids from this device.
    """
    owners, rows = [], []
    for lane in route.lanes:
        x = ids[lane.feature].reshape(-1)
        starts = jnp.asarray(lane.starts, jnp.int32)
        shard = jnp.clip(jnp.searchsorted(starts, x, side="right") - 1, 0, len(lane.starts) - 1)
        owners.append(jnp.where(x >= 0, jnp.asarray(lane.devices, jnp.int32)[shard], route.group.devices))
        rows.append(jnp.asarray(lane.offsets, jnp.int32)[shard] + x - starts[shard])
    owner, row = jnp.concatenate(owners), jnp.concatenate(rows)
    order = jnp.argsort(owner, stable=True)
    ordered = owner[order]
    first_of_owner = jnp.searchsorted(ordered, ordered, side="left")
    slot = jnp.zeros_like(owner).at[order].set(jnp.arange(owner.shape[0], dtype=jnp.int32) - first_of_owner)
    overflow = jnp.any((slot >= route.capacity) & (owner < route.group.devices))
    return owner, slot, row, overflow


def exchange_rows(
    route: BucketRoute, block: jax.Array, owner, slot, row, axes
) -> tuple[jax.Array, jax.Array]:
    """Step 2: rows to their owners and values back.

    Returns:
      served: [sources, capacity] int32 rows of this device's block it served (`block_rows`
        on empty slots), for the backward pass.
      values: [owners, capacity, width] float32, what this device's ids found.
    """
    n, empty = route.group.devices, route.group.block_rows
    out = jnp.full((n + 1, route.capacity), empty, jnp.int32).at[owner, slot].set(row, mode="drop")
    served = collectives.all_to_all(out[:n], axes)
    found = block.at[served].get(mode="fill", fill_value=0).astype(jnp.float32)
    return served, collectives.all_to_all(found, axes)


def pool_lanes(
    route: BucketRoute, values: jax.Array, owner, slot, coef: Mapping[str, jax.Array], ids
) -> dict[str, jax.Array]:
    """Step 3: every id's row (`values` [owners, capacity, width]) weighed and pooled."""
    rows = values.at[owner, slot].get(mode="fill", fill_value=0)  # [positions, width]
    blocks: dict[str, dict[int, jax.Array]] = {f: {} for f in route.features}
    start = 0
    for lane in route.lanes:
        x = ids[lane.feature]
        count = x.size
        part = rows[start : start + count].reshape(*x.shape, -1) * _weight(lane, coef, x)[..., None]
        start += count
        blocks[lane.feature][lane.cols[0]] = part.sum(axis=1) if lane.pooled else part
    return {
        f: jnp.concatenate([b[c] for c in sorted(b)], axis=-1) if len(b) > 1 else next(iter(b.values()))
        for f, b in blocks.items()
    }


def send_gradients(
    route: BucketRoute, act_grads: Mapping[str, jax.Array], owner, slot, coef, ids, axes
) -> jax.Array:
    """Backward: each id's weighted bag gradient to the slot its row came from.
    Returns `[sources, capacity, width]` at the owner, aligned with `served`."""
    parts = []
    for lane in route.lanes:
        g = act_grads[lane.feature].astype(jnp.float32)[..., lane.cols[0] : lane.cols[1]]
        x = ids[lane.feature]
        g = g[:, None, :] if lane.pooled else g  # a bag's positions share its gradient
        parts.append((_weight(lane, coef, x)[..., None] * g).reshape(-1, g.shape[-1]))
    grads = jnp.concatenate(parts)
    n = route.group.devices
    out = jnp.zeros((n + 1, route.capacity, route.group.width), jnp.float32)
    out = out.at[owner, slot].set(grads, mode="drop")
    return collectives.all_to_all(out[:n], axes)


def _weight(lane: Lane, coef: Mapping[str, jax.Array], ids: jax.Array) -> jax.Array:
    valid = ids >= 0
    return jnp.where(valid, coef[lane.feature], 0.0) if lane.feature in coef else valid.astype(jnp.float32)
