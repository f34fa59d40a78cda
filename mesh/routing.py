"""Routing a batch's ids to the owners of their rows, and results back (all_to_all).

Inside `jax.shard_map`, with the batch sharded over all devices, one sharded group
(`mesh.sharded.GroupLayout`) is served like this:

1. ids out: every device sends each shard's owner the ids of its own samples for the
   feature the shard serves, one `all_to_all` of `[devices, local_batch, columns]`. A
   table-wise or column-wise shard thus sees exactly the ids of its table, and each row
   shard of a row-wise table sees the feature's ids once (ids outside its rows weigh 0).
   There is no per-peer capacity, so nothing can overflow or be dropped.
2. lookup: the owner finds every received id in its block (one gather for all tables of
   the group) and pools each work item: `[devices, local_batch, outputs, width]`.
3. results back: a second `all_to_all`; each batch owner sums the row shards of a
   column block and places the column blocks side by side.
The backward pass sends activation gradients the way results came back (step 3 in
reverse) and reuses the ids routed in step 1, so each owner updates its rows in place.

Bytes one device sends per step, for a feature with L ids per sample, local batch b and
a table of `s` shards of width w: `s * b * L * 4` of ids out, `s * b * w * 4` of results
back and as much of gradients out (`broadcast_bytes`), times (k-1)/k for the share that
leaves the device. Compressed, a result row takes its codec's wire width and a packed id
the bytes that address the owner's shard (`CommConfig`). For a table-wise table each
sample's ids and result cross the network once; gathering the batch's ids and
reduce-scattering pooled results (the first version) moved every sample's to every
device.

The layout of a route is static (Python ints and NumPy arrays built once per trace);
per-device parts are indexed by the traced device index.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mesh import collectives
from mesh.collectives import CommConfig, packing
from mesh.sharded import GroupLayout, Placement, ShardedLayout


class Route(str, enum.Enum):
    """How a sharded group's ids reach their owners."""

    AUTO = "auto"  # per group, whichever of the others sends the fewest bytes
    BROADCAST = "broadcast"  # every shard of a table sees every id of its feature (here)
    ROWS = "rows"  # each id to its row's owner, the row back unpooled (`mesh.bucketed`)
    POOLED = "pooled"  # each id to its row's owner, pooled there (`mesh.bucketed`)


ROUTES = tuple(r.value for r in Route)
# The routes a step runs ("auto" chooses among them).
RUNTIME_ROUTES = (Route.BROADCAST.value, Route.ROWS.value, Route.POOLED.value)


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

    def row_bytes(self, width: int) -> int:
        """Wire bytes of one `width`-wide result row and its gradient row, in this
        setting's codecs (the cost model's W(w))."""
        return collectives.round_trip_bytes(self.comm.fwd, self.comm.bwd, width)


# An owner's embedding bag over its block, for a lookup through a kernel: (block [rows,
# width], ids [bags, batch, bag] int32 rows of the block, coef [bags, batch, bag] float32, 0
# where a position is not read (its id is then 0), pooled) -> [batch, bags, width] float32
# sums of coef * row when pooled, else [batch, bags, bag, width] of each position.
# `recsys.lookup.owner_bags` makes them; without one, owners gather with XLA.
BagFn = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class FeatureRoute:
    """What routing needs to know of a feature."""

    table: str
    pooled: bool  # False: one output per position (a sequence feature)
    ids_per_sample: int
    scaled: bool  # whether per-position coefficients (weights, 1/length) travel with the ids


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One (feature, shard) pair an owner serves."""

    feature: str
    placement: Placement
    column: int  # first column of the feature's ids in the owner's received buffer
    output: int  # first output slot at the owner
    ids: int
    pooled: bool

    @property
    def outputs(self) -> int:
        return 1 if self.pooled else self.ids


@dataclasses.dataclass(frozen=True, eq=False)
class GroupRoute:
    group: GroupLayout
    features: tuple[str, ...]
    items: tuple[tuple[WorkItem, ...], ...]  # per owner device
    columns: int  # received ids per sample and source, the most any owner gets
    outputs: int  # output slots per sample and source, the most any owner has
    scaled: bool
    # Per owner device and received column ([devices, columns]): where the id's rows sit.
    row_start: np.ndarray
    row_count: np.ndarray  # 0 on padding columns: nothing inside
    offset: np.ndarray
    output_of: np.ndarray
    table_dim: np.ndarray  # per owner and column: the table's dim (row-wise statistics)
    # Codecs: fwd of the pooled results on their way back, bwd of their gradients on the
    # way out, ids of the ids.
    comm: CommConfig = CommConfig()

    @property
    def column_split(self) -> bool:
        """Rows of this group's tables are split into column shards on several devices."""
        return self.group.strategy.column_split

    @property
    def id_bound(self) -> int:
        """Codes of packed ids: 0 for padding or outside the owner's rows, else the row
        within the shard + 1."""
        return int(self.row_count.max()) + 1

    @property
    def id_bytes(self) -> int:
        return packing.packed_bytes(self.comm.ids, self.id_bound)


def build_routes(layout: ShardedLayout, features: Mapping[str, FeatureRoute]) -> dict[str, GroupRoute]:
    """{group: GroupRoute} of every sharded group that some feature reads."""
    routes = {}
    for g in layout.groups:
        names = sorted(f for f, r in features.items() if layout.group_of[r.table] == g.name)
        if g.data_parallel or not names:
            continue
        per_device: list[list[WorkItem]] = [[] for _ in range(g.devices)]
        fill = [[0, 0] for _ in range(g.devices)]  # columns, outputs used per owner
        for f in names:
            r = features[f]
            for p in g.placements_of(r.table):
                column, output = fill[p.device]
                item = WorkItem(f, p, column, output, r.ids_per_sample, r.pooled)
                per_device[p.device].append(item)
                fill[p.device] = [column + item.ids, output + item.outputs]
        columns = max(1, max(c for c, _ in fill))
        outputs = max(1, max(o for _, o in fill))
        meta = {k: np.zeros((g.devices, columns), np.int32) for k in ("rs", "rc", "off", "out")}
        meta["dim"] = np.ones((g.devices, columns), np.float32)
        for d, items in enumerate(per_device):
            for it in items:
                cols = slice(it.column, it.column + it.ids)
                meta["rs"][d, cols] = it.placement.rows[0]
                meta["rc"][d, cols] = it.placement.row_count
                meta["off"][d, cols] = it.placement.offset
                positions = np.arange(it.ids)
                meta["out"][d, cols] = it.output if it.pooled else it.output + positions
                meta["dim"][d, cols] = layout.table_shapes[it.placement.table][1]
        routes[g.name] = GroupRoute(
            group=g,
            features=tuple(names),
            items=tuple(tuple(v) for v in per_device),
            columns=columns,
            outputs=outputs,
            scaled=any(features[f].scaled for f in names),
            row_start=meta["rs"],
            row_count=meta["rc"],
            offset=meta["off"],
            output_of=meta["out"],
            table_dim=meta["dim"],
        )
    return routes


def broadcast_bytes(route: GroupRoute, local_batch: int, devices: int) -> int:
    """Bytes one device sends per step on this route: ids (and coefficients) out, pooled
    results back, their gradients out."""
    share = (devices - 1) / devices
    ids = devices * local_batch * route.columns * (route.id_bytes + (4 if route.scaled else 0))
    row = collectives.round_trip_bytes(route.comm.fwd, route.comm.bwd, route.group.width)
    return int(share * (ids + devices * local_batch * route.outputs * row))


def send_ids(
    route: GroupRoute,
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    axes: tuple[str, ...],
    device: jax.Array,
) -> tuple[jax.Array, jax.Array | None]:
    """Step 1. ids: {feature: [local_batch, L] int32, -1 on padding}; coef: {feature:
    [local_batch, L] float32} for scaled features. Returns what this device received as an
    owner: ids `[sources, local_batch, columns]` and coefficients (None if unscaled).

    Packed ids (`route.comm.ids`) travel as codes of the owner's shard and come back as table
    ids, with -1 where an id was padding or outside this owner's rows (which `owner_rows`
    treats alike)."""

    def stacked(values, pad_value, dtype):
        per_owner = []
        for items in route.items:
            parts = [values(it.feature) for it in items]
            used = sum(it.ids for it in items)
            batch = next(iter(ids.values())).shape[0]
            if used < route.columns:
                parts.append(jnp.full((batch, route.columns - used), pad_value, dtype))
            per_owner.append(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        return jnp.stack(per_owner)

    out = stacked(lambda f: ids[f].astype(jnp.int32), -1, jnp.int32)  # [owners, local_batch, columns]
    if route.comm.ids == "packed":
        start, count = route.row_start[:, None, :], route.row_count[:, None, :]
        local = out - start
        codes = jnp.where((out >= 0) & (local >= 0) & (local < count), local + 1, 0)
        got = collectives.all_to_all(packing.pack(codes, route.id_bound), axes, purpose="ids")
        got = packing.unpack(got, route.id_bound)
        mine = jnp.asarray(route.row_start)[device][None, None, :]
        received_ids = jnp.where(got > 0, mine + got - 1, -1)
    else:
        received_ids = collectives.all_to_all(out, axes, purpose="ids")
    if not route.scaled:
        return received_ids, None
    ones = lambda f: jnp.ones(ids[f].shape, jnp.float32)  # noqa: E731
    coefficients = stacked(lambda f: coef[f] if f in coef else ones(f), 0.0, jnp.float32)
    return received_ids, collectives.all_to_all(coefficients, axes, purpose="ids")


def owner_rows(
    route: GroupRoute, received_ids: jax.Array, received_coef: jax.Array | None, device: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Rows in this device's block of every received id, and each position's weight.

    Returns:
      rows: [sources, local_batch, columns] int32; `block_rows` where the id is padding
        or outside this owner's shard.
      weight: same shape, float32; 0 exactly where `rows` is `block_rows`.
    """
    start = jnp.asarray(route.row_start)[device]
    count = jnp.asarray(route.row_count)[device]
    offset = jnp.asarray(route.offset)[device]
    local = received_ids - start
    inside = (local >= 0) & (local < count)
    rows = jnp.where(inside, offset + local, route.group.block_rows)
    weight = inside.astype(jnp.float32)
    if received_coef is not None:
        weight = weight * received_coef
    return rows, weight


def bag_columns(route: GroupRoute) -> tuple[np.ndarray, np.ndarray]:
    """The received columns pooled into each output slot, as bags for an embedding-bag
    kernel: `[devices, outputs, width]` column of each bag position, and whether the
    position is used (a pooled item's bag holds its ids; a sequence position is a bag of
    one). `width` is the longest bag."""
    width = max([it.ids if it.pooled else 1 for items in route.items for it in items] or [1])
    columns = np.zeros((route.group.devices, route.outputs, width), np.int32)
    used = np.zeros(columns.shape, bool)
    for d, items in enumerate(route.items):
        for it in items:
            if it.pooled:
                outputs, positions = np.full(it.ids, it.output), np.arange(it.ids)
            else:
                outputs, positions = it.output + np.arange(it.ids), np.zeros(it.ids, np.int32)
            columns[d, outputs, positions] = it.column + np.arange(it.ids)
            used[d, outputs, positions] = True
    return columns, used


def pool(
    route: GroupRoute, block: jax.Array, rows: jax.Array, weight: jax.Array, device, bag: BagFn | None = None
) -> jax.Array:
    """Step 2: [sources, local_batch, outputs, width] float32 pooled work items. With `bag`,
    one embedding-bag call pools every work item (`bag_columns`); else XLA gathers the
    rows and scatter-adds them into their slots."""
    if bag is not None:
        columns, used = (jnp.asarray(x)[device] for x in bag_columns(route))  # [outputs, width]
        k, b = rows.shape[:2]
        bag_weight = weight[:, :, columns] * used  # [sources, local_batch, outputs, width]
        bag_rows = jnp.where(bag_weight != 0, rows[:, :, columns], 0)  # in range where read
        to_bags = lambda x: jnp.moveaxis(x.reshape(k * b, *x.shape[2:]), 1, 0)  # noqa: E731
        pooled = bag(block, to_bags(bag_rows), to_bags(bag_weight), True)  # [k * b, outputs, width]
        return pooled.reshape(k, b, route.outputs, route.group.width)
    values = block.at[rows].get(mode="fill", fill_value=0).astype(jnp.float32) * weight[..., None]
    out_of = jnp.asarray(route.output_of)[device]
    k, b = rows.shape[:2]
    out = jnp.zeros((k, b, route.outputs, route.group.width), jnp.float32)
    return out.at[:, :, out_of].add(values)


def return_outputs(route: GroupRoute, pooled: jax.Array, axes: tuple[str, ...]) -> dict[str, jax.Array]:
    """Step 3: the pooled work items back to the batch owners -> {feature: activations}."""
    received = collectives.all_to_all(
        pooled, axes, route.comm.fwd, "fwd"
    )  # [owners, local_batch, outputs, width]
    blocks: dict[str, dict[int, jax.Array]] = {f: {} for f in route.features}
    for owner, items in enumerate(route.items):
        for it in items:
            if it.pooled:
                part = received[owner, :, it.output]
            else:
                part = received[owner, :, it.output : it.output + it.ids]
            c0 = it.placement.cols[0]
            have = blocks[it.feature]
            have[c0] = part if c0 not in have else have[c0] + part  # row shards add up
    return {
        f: jnp.concatenate([b[c] for c in sorted(b)], axis=-1) if len(b) > 1 else next(iter(b.values()))
        for f, b in blocks.items()
    }


def send_gradients(route: GroupRoute, act_grads: Mapping[str, jax.Array], axes) -> jax.Array:
    """Step 3 reversed: activation gradients -> `[sources, local_batch, outputs, width]` at
    each owner, matching its work items."""
    width = route.group.width
    per_owner = []
    for items in route.items:
        parts = []
        for it in items:
            g = act_grads[it.feature].astype(jnp.float32)
            c0 = it.placement.cols[0]
            parts.append(g[:, None, c0 : c0 + width] if it.pooled else g[:, :, c0 : c0 + width])
        batch = next(iter(act_grads.values())).shape[0]
        used = sum(it.outputs for it in items)
        if used < route.outputs:
            parts.append(jnp.zeros((batch, route.outputs - used, width), jnp.float32))
        per_owner.append(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
    return collectives.all_to_all(jnp.stack(per_owner), axes, route.comm.bwd, "bwd")


def position_gradients(route: GroupRoute, grads: jax.Array, weight: jax.Array, device) -> jax.Array:
    """Gradient of every received position's row: [sources, local_batch, columns, width]."""
    out_of = jnp.asarray(route.output_of)[device]
    return grads[:, :, out_of] * weight[..., None]


def exchange_statistic(route: GroupRoute, partial: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Completes row-wise Adagrad's statistic of column shards over the whole row.

    `partial` [sources, local_batch, columns] holds, at every position this owner serves,
    the sum over its columns of its row's squared gradient (0 outside its rows). Each
    shard of a table receives every id of its feature, so the sender of a position adds
    what all of them report for it (only the row's own shards report anything) and sends
    the whole row's mean over the table's dim back to each: two `all_to_all`s shaped like
    the ids', only among the owners that served the position. Returns `[sources,
    local_batch, columns]` at the owner.
    """
    reported = collectives.all_to_all(
        partial, axes, purpose="stats"
    )  # [owners, local_batch, columns] at the sender
    whole: dict[str, jax.Array] = {}
    for owner, items in enumerate(route.items):
        for it in items:
            part = reported[owner, :, it.column : it.column + it.ids]
            whole[it.feature] = whole[it.feature] + part if it.feature in whole else part
    per_owner = []
    for owner, items in enumerate(route.items):
        parts = [whole[it.feature] / route.table_dim[owner, it.column] for it in items]
        used = sum(it.ids for it in items)
        if used < route.columns:
            parts.append(jnp.zeros((partial.shape[1], route.columns - used), jnp.float32))
        per_owner.append(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
    return collectives.all_to_all(jnp.stack(per_owner), axes, purpose="stats")
