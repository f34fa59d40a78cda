"""Bucketized routing for row-sharded groups: each id travels only to the owners of its row.

`mesh.routing` sends a feature's ids to every row shard of its table and gets a pooled
partial back from each, which costs `owners x (ids + one pooled vector)` per sample. The
two routes here send each id only to the device(s) holding its row:
- "rows": the row comes back unpooled and the batch owner pools: `capacity_factor x
  (ids + one vector per id)` per sample. Less whenever a feature has fewer ids per sample
  than its table has row shards (pooling 1-10 over 8-1024 devices). Whole rows only.
- "pooled": each id travels with its position in the sender's batch, the owner pools
  what it serves and pooled partials come back as on the broadcast route (the input
  distribution of TorchRec's row-wise sharding): `capacity_factor x ids x 2 + owners x
  one pooled vector`. It wins when features have many ids per sample, and it serves column
  shards too (a grid): an id goes to one row shard of each column block, and the
  row-wise Adagrad statistic of a row is completed through the senders
  (`exchange_statistic`), without the all-reduce over the whole batch's positions.

Static shapes need a fixed number of slots per peer: `capacity = capacity_factor x` the
most ids any owner expects from one source if ids were spread like its rows. Skewed
batches can need more. Every device computes whether any of its buckets overflowed, one
`psum` makes the verdict global, and the whole group then takes the broadcast route for
that step (`lax.cond`), so an id is never dropped; the step reports the fallback. The
buckets themselves travel on every step, outside the `cond` (`mesh.sharded_lookup`), so
their all-to-all can run beside compute; an overflowing step drops them.

Forward, inside `jax.shard_map`, for one group:
1. `assign`: per id (and column block), its owner, its row in the owner's block, its
   slot among the ids this device sends that owner (rank by a stable sort) and, pooling
   at the owner, its output position there.
2. rows: `send_rows` sends `[owners, capacity]` block rows out, `return_rows` brings
   `[owners, capacity, width]` values back; `pool_lanes` weighs and pools them on the
   batch owner.
   pooled: `send_slots` sends rows, positions (and coefficients) out; `pool_at_owner`
   pools into the broadcast route's work items, which `mesh.routing.return_outputs`
   brings back.
Backward: rows: `send_gradients` weighs each id's bag gradient and sends it to the slot
its row came from. pooled: the pooled gradients travel as on the broadcast route and
`slot_gradients` spreads them over the slots. The owner updates the rows it served.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mesh import collectives
from mesh.collectives import CommConfig, packing
from mesh.routing import BagFn, GroupRoute
from mesh.sharded import GroupLayout, ShardedLayout


@dataclasses.dataclass(frozen=True)
class Lane:
    """One feature's ids in one column block and which device owns each row there."""

    feature: str
    cols: tuple[int, int]  # the column block (the whole dim on the "rows" route)
    ids: int  # ids per sample
    pooled: bool
    starts: tuple[int, ...]  # first row of each row shard, ascending
    devices: tuple[int, ...]
    offsets: tuple[int, ...]  # where each shard starts in its owner's block
    outputs: tuple[int, ...]  # "pooled": each shard's output slot at its owner (`mesh.routing`)
    dim: int  # the table's


@dataclasses.dataclass(frozen=True)
class BucketRoute:
    group: GroupLayout
    features: tuple[str, ...]
    lanes: tuple[Lane, ...]
    capacity: int  # slots per (source, owner) pair
    positions: int  # ids one device sends per step: local_batch x sum of lane ids
    pool_at_owner: bool = False  # the "pooled" route; False: "rows"
    outputs: int = 1  # "pooled": output slots per sample at an owner (the broadcast route's)
    scaled: bool = False  # "pooled": coefficients travel with the ids
    # Codecs: fwd of the rows found and bwd of their gradients ("rows" route), ids of the
    # rows and positions.
    comm: CommConfig = CommConfig()

    @property
    def column_split(self) -> bool:
        """Some table's rows lie in several column blocks (one lane per feature and block)."""
        return len(self.lanes) > len(self.features)

    @property
    def local_batch(self) -> int:
        return self.positions // sum(lane.ids for lane in self.lanes)

    def row_bytes(self) -> int:
        """Wire bytes of a served row (`block_rows` marks an empty slot)."""
        return packing.packed_bytes(self.comm.ids, self.group.block_rows + 1)

    def at_bytes(self) -> int:
        """Wire bytes of an output position at the owner ("pooled" route)."""
        return packing.packed_bytes(self.comm.ids, self.local_batch * self.outputs)


def bucketizable(layout: ShardedLayout, g: GroupLayout) -> bool:
    """Row-sharded groups whose rows are whole on their owners (a grid of one column
    shard, e.g. on one host): the "rows" route."""
    return g.strategy.row_sharded and all(layout.table_shapes[t][1] == g.width for t in g.tables)


def poolable(g: GroupLayout, features) -> bool:
    """Row-sharded groups (column blocks allowed) read only by pooled features: the
    "pooled" route."""
    return g.strategy.row_sharded and all(r.pooled for r in features.values())


def build_bucket_routes(
    layout: ShardedLayout,
    features,
    local_batch: int,
    capacity_factor: float,
    broadcast: Mapping[str, GroupRoute] | None = None,
) -> dict[str, BucketRoute]:
    """{group: BucketRoute} for every group some feature reads that a bucketized route
    serves: "rows" without `broadcast`; "pooled" with the groups' broadcast routes, whose
    work items the owners pool into."""
    routes = {}
    for g in layout.groups:
        names = sorted(f for f, r in features.items() if layout.group_of[r.table] == g.name)
        if not names:
            continue
        mine = {f: features[f] for f in names}
        pool = broadcast is not None
        if not (poolable(g, mine) if pool else bucketizable(layout, g)):
            continue
        lanes, expected = [], np.zeros(g.devices)
        for f in names:
            r = features[f]
            blocks: dict[tuple[int, int], list] = {}
            for p in g.placements_of(r.table):
                blocks.setdefault(p.cols, []).append(p)
            for cols in sorted(blocks):
                shards = sorted(blocks[cols], key=lambda p: p.rows)
                outputs = [_output_slot(broadcast[g.name], f, p) if pool else 0 for p in shards]
                lanes.append(
                    Lane(
                        f,
                        cols,
                        r.ids_per_sample,
                        r.pooled,
                        tuple(p.rows[0] for p in shards),
                        tuple(p.device for p in shards),
                        tuple(p.offset for p in shards),
                        tuple(outputs),
                        layout.table_shapes[r.table][1],
                    )
                )
                for p in shards:  # ids spread like rows: the share of ids each owner expects
                    expected[p.device] += local_batch * r.ids_per_sample * layout.id_share(p)
        positions = local_batch * sum(lane.ids for lane in lanes)
        capacity = min(positions, max(1, math.ceil(capacity_factor * expected.max())))
        routes[g.name] = BucketRoute(
            g,
            tuple(names),
            tuple(lanes),
            capacity,
            positions,
            pool_at_owner=pool,
            outputs=broadcast[g.name].outputs if pool else 1,
            scaled=pool and any(r.scaled for r in mine.values()),
        )
    return routes


def _output_slot(route: GroupRoute, feature: str, placement) -> int:
    (item,) = [
        it for it in route.items[placement.device] if it.feature == feature and it.placement == placement
    ]
    return item.output


def bucket_bytes(route: BucketRoute, devices: int, local_batch: int = 0) -> int:
    """Bytes one device sends per step on this route, in the route's codecs. rows: ids
    out, rows back, gradients out. pooled (needs `local_batch`): ids and positions (and
    coefficients) out, pooled results back, their gradients out. Column blocks under
    row-wise Adagrad add the statistic's two exchanges, `2 * capacity * 4` per peer
    (`exchange_statistic`); the route choice leaves them out, as the lookup does not know
    the optimizer."""
    share = (devices - 1) / devices
    slots = devices * route.capacity
    row = collectives.round_trip_bytes(route.comm.fwd, route.comm.bwd, route.group.width)
    if not route.pool_at_owner:
        return int(share * slots * (route.row_bytes() + row))
    per_slot = route.row_bytes() + route.at_bytes() + (4 if route.scaled else 0)
    return int(share * (slots * per_slot + devices * local_batch * route.outputs * row))


class Assignment(NamedTuple):
    """Where each of this device's ids (one per lane position) goes: `assign`."""

    owner: jax.Array  # [positions] int32 owner device (`devices` for padding)
    slot: jax.Array  # [positions] int32 slot among the ids sent to that owner
    row: jax.Array  # [positions] int32 row in the owner's block
    at: jax.Array  # [positions] int32 "pooled": sample * outputs + output slot at the owner
    overflow: jax.Array  # bool: some owner gets more than `capacity` ids from this device


def assign(route: BucketRoute, ids: Mapping[str, jax.Array]) -> Assignment:
    """Step 1 for this device's ids ({feature: [local_batch, L], -1 on padding})."""
    owners, rows, at = [], [], []
    for lane in route.lanes:
        x = ids[lane.feature].reshape(-1)
        starts = jnp.asarray(lane.starts, jnp.int32)
        shard = jnp.clip(jnp.searchsorted(starts, x, side="right") - 1, 0, len(lane.starts) - 1)
        owners.append(jnp.where(x >= 0, jnp.asarray(lane.devices, jnp.int32)[shard], route.group.devices))
        rows.append(jnp.asarray(lane.offsets, jnp.int32)[shard] + x - starts[shard])
        sample = jnp.arange(x.shape[0], dtype=jnp.int32) // lane.ids
        at.append(sample * route.outputs + jnp.asarray(lane.outputs, jnp.int32)[shard])
    owner, row = jnp.concatenate(owners), jnp.concatenate(rows)
    order = jnp.argsort(owner, stable=True)
    ordered = owner[order]
    first_of_owner = jnp.searchsorted(ordered, ordered, side="left")
    slot = jnp.zeros_like(owner).at[order].set(jnp.arange(owner.shape[0], dtype=jnp.int32) - first_of_owner)
    overflow = jnp.any((slot >= route.capacity) & (owner < route.group.devices))
    return Assignment(owner, slot, row, jnp.concatenate(at), overflow)


def served_rows(
    block: jax.Array, served: jax.Array, weight: jax.Array | None, bag: BagFn | None
) -> jax.Array:
    """`[sources, capacity, width]` float32: each served row of this owner's block times its
    weight (None: once), 0 on empty slots (whose row is `block_rows`) and where the weight is
    0. With `bag`, one embedding-bag call gathers them (a sequence of `capacity` positions
    per source); without, XLA's gather fills the empty slots with 0."""
    if bag is None:
        values = block.at[served].get(mode="fill", fill_value=0).astype(jnp.float32)
        return values if weight is None else values * weight[..., None]
    if weight is None:
        weight = (served < block.shape[0]).astype(jnp.float32)
    rows = jnp.where(weight != 0, served, 0)
    return bag(block, rows[None], weight[None], False)[:, 0]


def send_rows(route: BucketRoute, a: Assignment, axes) -> jax.Array:
    """Step 2 out: each id's row to its owner. Returns the `[sources, capacity]` int32
    rows of this device's block it serves (`block_rows` on empty slots); they depend on
    the batch only, so a pipelined step sends the next batch's ahead."""
    n, empty = route.group.devices, route.group.block_rows
    out = jnp.full((n + 1, route.capacity), empty, jnp.int32).at[a.owner, a.slot].set(a.row, mode="drop")
    if route.comm.ids == "packed":
        bound = empty + 1
        return packing.unpack(
            collectives.all_to_all(packing.pack(out[:n], bound), axes, purpose="ids"), bound
        )
    return collectives.all_to_all(out[:n], axes, purpose="ids")


def return_rows(
    route: BucketRoute, block: jax.Array, served: jax.Array, axes, bag: BagFn | None = None
) -> jax.Array:
    """Step 2 back: the served rows' values (gathered through `bag` when given) to the ids
    that asked, `[owners, capacity, width]` float32 at each batch owner."""
    found = served_rows(block, served, None, bag)
    return collectives.all_to_all(found, axes, route.comm.fwd, "fwd")


def pool_lanes(
    route: BucketRoute, values: jax.Array, owner, slot, coef: Mapping[str, jax.Array], ids
) -> dict[str, jax.Array]:
    """Step 3: every id's row (`values` [owners, capacity, width], at the `owner` and
    `slot` `assign` gave it) weighed and pooled."""
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


def send_gradients(route: BucketRoute, act_grads: Mapping[str, jax.Array], owner, slot, coef, ids, axes):
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
    return collectives.all_to_all(out[:n], axes, route.comm.bwd, "bwd")


def send_slots(route: BucketRoute, a: Assignment, coef: Mapping[str, jax.Array], ids, axes):
    """Pooled route, step 2 out: each id's row, output position and weight to its owner, in one
    `all_to_all` of int32 (a coefficient travels as its bits), or of bytes with packed ids
    (rows and positions in their fewest bytes, a coefficient's 4 bytes after them).

    Returns, at the owner, `[sources, capacity]` each: served rows (`block_rows` on empty
    slots), output positions `at` and float32 weights (0 on empty slots).
    """
    n, empty = route.group.devices, route.group.block_rows
    weight = jnp.concatenate([_weight(lane, coef, ids[lane.feature]).reshape(-1) for lane in route.lanes])
    fields = [a.row, a.at] + ([jax.lax.bitcast_convert_type(weight, jnp.int32)] if route.scaled else [])
    fill = jnp.asarray([empty, 0, 0][: len(fields)], jnp.int32)
    out = jnp.broadcast_to(fill, (n + 1, route.capacity, len(fields)))
    out = out.at[a.owner, a.slot].set(jnp.stack(fields, axis=-1), mode="drop")[:n]
    if route.comm.ids == "packed":  # rows and positions in their fewest bytes, a weight's 4 after them
        widths = [packing.id_bytes(empty + 1), packing.id_bytes(route.local_batch * route.outputs), 4]
        widths = widths[: len(fields)]
        payload = [packing.to_bytes(out[..., i : i + 1], w) for i, w in enumerate(widths)]
        got = collectives.all_to_all(jnp.concatenate(payload, axis=-1), axes, purpose="ids")
        edges = np.cumsum([0, *widths])
        got = jnp.concatenate(
            [packing.from_bytes(got[..., a:b], b - a) for a, b in zip(edges[:-1], edges[1:])], axis=-1
        )
    else:
        got = collectives.all_to_all(out, axes, purpose="ids")
    served, at = got[..., 0], got[..., 1]
    if route.scaled:
        return served, at, jax.lax.bitcast_convert_type(got[..., 2], jnp.float32)
    return served, at, (served < empty).astype(jnp.float32)


def pool_at_owner(
    route: BucketRoute, block: jax.Array, served, at, weight, local_batch: int, bag: BagFn | None = None
) -> jax.Array:
    """Pooled route, step 2 at the owner: the served rows weighed (gathered through `bag` when
    given) and pooled into the broadcast route's work items, `[sources, local_batch,
    outputs, width]` for `mesh.routing.return_outputs`."""
    values = served_rows(block, served, weight, bag)
    k, width = served.shape[0], route.group.width
    pooled = jnp.zeros((k, local_batch * route.outputs, width), jnp.float32)
    pooled = pooled.at[jnp.arange(k)[:, None], at].add(values)
    return pooled.reshape(k, local_batch, route.outputs, width)


def slot_gradients(route: BucketRoute, grads: jax.Array, at, weight) -> jax.Array:
    """Pooled route, backward at the owner: the pooled gradients (`mesh.routing.send_gradients`,
    `[sources, local_batch, outputs, width]`) spread over the slots that fed them, weighed:
    `[sources, capacity, width]`, aligned with the served rows."""
    k = grads.shape[0]
    flat = grads.reshape(k, -1, route.group.width)
    return jnp.take_along_axis(flat, at[..., None], axis=1) * weight[..., None]


def exchange_statistic(route: BucketRoute, partial: jax.Array, owner, slot, axes) -> jax.Array:
    """Row-wise Adagrad over column blocks on the "pooled" route.

    `partial` [sources, capacity] holds, per served slot, the sum over this owner's
    columns of its row's squared gradient (summed over the whole batch). Every column
    block of a row receives each of the row's ids, so the sender adds, per position, what
    the owners of its column blocks report and returns the whole row's mean over the
    table's dim to each of them: two `all_to_all`s of `[peers, capacity]` floats.
    Returns `[sources, capacity]`.
    """
    n = route.group.devices
    reported = (
        collectives.all_to_all(partial, axes, purpose="stats")
        .at[owner, slot]
        .get(mode="fill", fill_value=0.0)
    )
    local_batch = owner.shape[0] // sum(lane.ids for lane in route.lanes)
    segments, start = [], 0
    for lane in route.lanes:
        size = local_batch * lane.ids
        segments.append(reported[start : start + size])
        start += size
    whole = {}
    for lane, part in zip(route.lanes, segments):  # a feature's column blocks add up
        whole[lane.feature] = whole[lane.feature] + part if lane.feature in whole else part
    mean = jnp.concatenate([whole[lane.feature] / lane.dim for lane in route.lanes])
    out = jnp.zeros((n + 1, route.capacity), jnp.float32).at[owner, slot].set(mean, mode="drop")
    return collectives.all_to_all(out[:n], axes, purpose="stats")


def _weight(lane: Lane, coef: Mapping[str, jax.Array], ids: jax.Array) -> jax.Array:
    valid = ids >= 0
    return jnp.where(valid, coef[lane.feature], 0.0) if lane.feature in coef else valid.astype(jnp.float32)
