"""Moving a table between its logical form and its group storage, shard by shard.

A checkpoint holds every table as one logical `[rows, dim]` array split over the devices
(`mesh.sharded.logical_sharding`: a grid of row x column blocks, each block on one or more
devices). The plan's layout holds it as shards inside group blocks. Converting between
the two with plain `jit` lets XLA's partitioner choose, and it gathered whole tables onto
every device (2-3x a table's bytes of temporaries per device). Here the moves
are explicit: every (logical block, shard) overlap is a rectangular piece with a static
source, destination and size; pieces are scheduled into rounds in which each device
sends at most one piece and receives at most one, and each round is one
`collectives.permute`. A device never holds more than its own blocks plus one piece in flight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mesh import collectives
from mesh.sharded import GroupLayout, ShardedLayout, check_shape, logical_sharding

_GRID_AXES = ("rows", "cols", "copies")


@dataclasses.dataclass(frozen=True, order=True)
class Piece:
    src: int  # global device index
    dst: int
    src_start: tuple[int, int]  # in the source device's local 2-D block
    dst_start: tuple[int, int]
    size: tuple[int, int]


def schedule(pieces: list[Piece]) -> list[list[Piece]]:
    """Greedy rounds of equal-sized pieces in which each device sends at most one piece and
    receives at most one. Equal sizes let every window be exact, so nothing is padded."""
    rounds: list[tuple[tuple[int, int], set, set, list[Piece]]] = []
    for piece in sorted(pieces, key=lambda p: (-p.size[0] * p.size[1], p.size, p.src, p.dst)):
        for entry in rounds:
            size, senders, receivers, members = entry
            if size == piece.size and piece.src not in senders and piece.dst not in receivers:
                break
        else:
            size, senders, receivers, members = piece.size, set(), set(), []
            rounds.append((size, senders, receivers, members))
        senders.add(piece.src)
        receivers.add(piece.dst)
        members.append(piece)
    return [members for *_, members in rounds]


def _grid(rows: int, dim: int | None, mesh: jax.sharding.Mesh):
    """The logical sharding's device grid, its block shape, and (r, c) -> devices holding it."""
    sharding = logical_sharding(rows, dim, mesh)
    grid = sharding.mesh
    r_parts, c_parts, copies = grid.devices.shape
    block = (rows // r_parts, (dim or 1) // c_parts)
    index = {dev.id: i for i, dev in enumerate(mesh.devices.reshape(-1))}
    holders = {
        (r, c): [index[grid.devices[r, c, k].id] for k in range(copies)]
        for r in range(r_parts)
        for c in range(c_parts)
    }
    return grid, block, holders


def _overlaps(layout: ShardedLayout, g: GroupLayout, table: str, block, holders, per_column: bool):
    """Every (logical block, shard) overlap as (placement, the block's holder devices, its
    corner in the block, its corner in the shard's device block, its size); the two
    conversions send these pieces in opposite directions."""
    for p in g.placements_of(table):
        cols = p.cols if per_column else (0, 1)
        for (r, c), devices in holders.items():
            r0, r1 = max(p.rows[0], r * block[0]), min(p.rows[1], (r + 1) * block[0])
            c0, c1 = max(cols[0], c * block[1]), min(cols[1], (c + 1) * block[1])
            if r0 < r1 and c0 < c1:
                in_block = (r0 - r * block[0], c0 - c * block[1])
                in_storage = (p.offset + r0 - p.rows[0], c0 - cols[0])
                yield p, devices, in_block, in_storage, (r1 - r0, c1 - c0)


def _move(src: jax.Array, dst: jax.Array, rounds: list[list[Piece]], axes, device, n: int) -> jax.Array:
    """Inside `shard_map`: copies the scheduled pieces from every `src` block into `dst`."""
    for members in rounds:
        size = members[0].size  # every window is in bounds on every device: no clamping
        send = np.zeros((n, 2), np.int32)
        recv = np.zeros((n, 2), np.int32)
        receiving = np.zeros((n,), bool)
        for p in members:
            send[p.src], recv[p.dst], receiving[p.dst] = p.src_start, p.dst_start, True
        send, recv, receiving = (jnp.asarray(a)[device] for a in (send, recv, receiving))
        piece = lax.dynamic_slice(src, (send[0], send[1]), size)
        got = collectives.permute(piece, axes, [(p.src, p.dst) for p in members])
        window = lax.dynamic_slice(dst, (recv[0], recv[1]), size)
        dst = lax.dynamic_update_slice(dst, jnp.where(receiving, got, window), (recv[0], recv[1]))
    return dst


def place_table(
    layout: ShardedLayout, group: str, table: str, storage: jax.Array, logical: jax.Array, mesh
) -> jax.Array:
    """Writes one table's logical array (held as `logical_sharding`) into its shards of a
    sharded group's storage (donated). Returns the new storage."""
    return place_program(layout, group, table, logical.ndim == 2, mesh)(storage, logical)


def place_program(layout: ShardedLayout, group: str, table: str, per_column: bool, mesh):
    """The jitted `place_table` (its compiled memory use is tested)."""
    g = layout.group(group)
    rows, dim = layout.table_shapes[table]
    grid, block, holders = _grid(rows, dim if per_column else None, mesh)
    pieces = [
        Piece(
            devices[p.device % len(devices)], p.device, in_block, in_storage, size
        )  # spread reads over copies
        for p, devices, in_block, in_storage, size in _overlaps(layout, g, table, block, holders, per_column)
    ]
    rounds = schedule(pieces)
    axes = _GRID_AXES

    def body(storage, logical):
        device = lax.axis_index(axes)
        local = storage[0] if per_column else storage[0][:, None]
        block_2d = logical if per_column else logical[:, None]
        out = _move(block_2d, local, rounds, axes, device, g.devices)
        return (out if per_column else out[:, 0])[None]

    logical_spec = P("rows", "cols") if per_column else P("rows")
    mapped = collectives.ordered_shard_map(
        body, mesh=grid, in_specs=(P(axes), logical_spec), out_specs=P(axes)
    )
    # The storage comes out on the trainer's mesh, as the train step returns it, not on
    # `grid` (the same devices in the same order, but another sharding to jit's cache:
    # the step's second call recompiled). The two are equivalent, so nothing moves.
    return jax.jit(lambda s, x: mapped(None, s, x)[1], donate_argnums=0, out_shardings=g.sharding(mesh))


def take_table(layout: ShardedLayout, group: str, table: str, storage: jax.Array, mesh) -> jax.Array:
    """One table's logical array (as `logical_sharding`) read out of a sharded group's storage."""
    return take_program(layout, group, table, storage.ndim == 3, mesh)(storage)


def take_program(layout: ShardedLayout, group: str, table: str, per_column: bool, mesh):
    """The jitted `take_table` (its compiled memory use is tested)."""
    g = layout.group(group)
    rows, dim = layout.table_shapes[table]
    grid, block, holders = _grid(rows, dim if per_column else None, mesh)
    pieces = [
        Piece(p.device, dst, in_storage, in_block, size)
        for p, devices, in_block, in_storage, size in _overlaps(layout, g, table, block, holders, per_column)
        for dst in devices  # every copy of the block receives it
    ]
    rounds = schedule(pieces)
    axes = _GRID_AXES

    def body(storage):
        device = lax.axis_index(axes)
        local = storage[0] if per_column else storage[0][:, None]
        out = _move(local, jnp.zeros(block, storage.dtype), rounds, axes, device, g.devices)
        return out if per_column else out[:, 0]

    logical_spec = P("rows", "cols") if per_column else P("rows")
    # The copies of a block receive identical pieces; shard_map cannot prove that, so the
    # replication check over "copies" is off.
    mapped = collectives.ordered_shard_map(
        body, mesh=grid, in_specs=P(axes), out_specs=logical_spec, check_vma=False
    )
    # An explicit output sharding: left to jit, a grid that splits rows 4 ways and columns
    # 2 ways (300 rows, 8 devices) comes back as a tiling jax cannot name on `grid`.
    return jax.jit(lambda s: mapped(None, s)[1], out_shardings=NamedSharding(grid, logical_spec))


def to_logical(
    layout: ShardedLayout, group: str, storage: jax.Array, mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """One group's storage (table or slot) -> {table: logical array as `logical_sharding`}."""
    g = layout.group(group)
    if not g.data_parallel:
        return {t: take_table(layout, group, t, storage, mesh) for t in g.tables}
    per_column = storage.ndim == 2
    out = {}
    for p in g.placements:  # replicated: every device holds the whole stack anyway
        rows, dim = layout.table_shapes[p.table]
        target = logical_sharding(rows, dim if per_column else None, mesh)
        rows_of = slice(p.offset, p.offset + rows)
        out[p.table] = jax.jit(lambda s, rows_of=rows_of: s[rows_of], out_shardings=target)(storage)
    return out


def from_logical(layout: ShardedLayout, group: str, logical, mesh: jax.sharding.Mesh) -> jax.Array:
    """The inverse of `to_logical`: {table: logical array} -> the group's storage."""
    g = layout.group(group)
    for t in g.tables:
        check_shape(t, layout.table_shapes[t], logical[t])
    first = logical[g.tables[0]]
    per_column, dtype = first.ndim == 2, first.dtype
    if g.data_parallel:
        stack = lambda *parts: jnp.concatenate([x.astype(dtype) for x in parts])  # noqa: E731
        return jax.jit(stack, out_shardings=g.sharding(mesh))(*(logical[t] for t in g.tables))
    storage = jax.jit(lambda: jnp.zeros(g.shape(per_column), dtype), out_shardings=g.sharding(mesh))()
    for t in g.tables:
        rows, dim = layout.table_shapes[t]
        value = jax.device_put(logical[t], logical_sharding(rows, dim if per_column else None, mesh))
        storage = place_table(layout, group, t, storage, value.astype(dtype), mesh)
    return storage
