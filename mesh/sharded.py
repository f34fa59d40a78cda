"""Tables laid out on a mesh as a `ShardingPlan` says, and the forward lookup over them.

Layout. A non-data-parallel table `t` is one array `[devices, slots, rows_per_slot,
width]` sharded over all mesh axes on its leading dimension: device d's block holds the
shards the plan gives d (at most `slots` of them, zero-padded to the largest shard's
rows). Static per-device metadata says where each slot's rows and columns sit in the
logical table. A data-parallel table is its logical `[rows, dim]` array, replicated.

Forward lookup, inside `jax.shard_map` with the batch sharded over all devices: every
device gathers the feature's ids and coefficients of the whole batch, pools the rows its
own shards hold (ids outside a shard's rows contribute 0), writes them into their
columns of a `[batch, dim]` buffer, and a sum-scatter over the batch returns to each
device the activations of its own samples. One algorithm covers every strategy and
hybrid, since each is a set of row x column shards; pooling is linear, so partial pools
of row shards add up. (This moves the whole batch's ids and activations; all_to_all
routing for table-wise and column-wise tables comes with the backward pass.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mesh import collectives
from mesh.meshes import mesh_spec
from mesh.plan import ShardingPlan, Strategy, validate_plan


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """Where one table's shards sit: static, per device and slot."""

    name: str
    rows: int
    dim: int
    data_parallel: bool
    slots: int = 0
    rows_per_slot: int = 0
    width: int = 0
    row_start: tuple[tuple[int, ...], ...] = ()  # [devices][slots]
    row_count: tuple[tuple[int, ...], ...] = ()  # [devices][slots]; 0 marks an empty slot
    col_start: tuple[tuple[int, ...], ...] = ()  # [devices][slots]

    def placements(self):
        """(device, slot, cells) of every non-empty slot; `cells` indexes the slot's part of
        a logical `[rows, dim]` array, or of a `[rows]` one through `cells[:1]`."""
        for d in range(len(self.row_start)):
            for s in range(self.slots):
                r0, count, c0 = self.row_start[d][s], self.row_count[d][s], self.col_start[d][s]
                if count:
                    yield d, s, (slice(r0, r0 + count), slice(c0, c0 + self.width))

    def slot_metadata(self, device: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """[slots] int32 row start, row count and column start of `device` (traced, inside
        `shard_map`)."""
        return tuple(
            jnp.asarray(x, jnp.int32)[device] for x in (self.row_start, self.row_count, self.col_start)
        )


def table_layouts(plan: ShardingPlan, tables, mesh: jax.sharding.Mesh) -> dict[str, TableLayout]:
    """Validates `plan` for `mesh` and derives every table's slot layout."""
    spec = mesh_spec(mesh)
    validate_plan(plan, tables, spec)
    n = spec.size
    out = {}
    for t in tables:
        p = plan.tables[t.name]
        if p.strategy is Strategy.DATA_PARALLEL:
            out[t.name] = TableLayout(t.name, t.rows, t.dim, True)
            continue
        per_device = [[s for s in p.shards if s.device == d] for d in range(n)]
        slots = max(len(s) for s in per_device)
        out[t.name] = TableLayout(
            t.name,
            t.rows,
            t.dim,
            False,
            slots=slots,
            rows_per_slot=max(s.rows[1] - s.rows[0] for s in p.shards),
            width=p.shards[0].cols[1] - p.shards[0].cols[0],
            row_start=_pad(([s.rows[0] for s in shards] for shards in per_device), slots),
            row_count=_pad(([s.rows[1] - s.rows[0] for s in shards] for shards in per_device), slots),
            col_start=_pad(([s.cols[0] for s in shards] for shards in per_device), slots),
        )
    return out


def _pad(values, slots: int) -> tuple[tuple[int, ...], ...]:
    """Per-device lists -> a rectangular [devices][slots] tuple, padded with 0."""
    return tuple(tuple(v) + (0,) * (slots - len(v)) for v in values)


def _axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def shard_rows(lay: TableLayout, value, mesh: jax.sharding.Mesh) -> jax.Array:
    """A per-row array of a table ([rows, dim]: the table or an elementwise optimizer slot;
    [rows]: a row-wise slot) -> its sharded storage, laid out like the table."""
    value = np.asarray(value)
    if value.shape[0] != lay.rows or (value.ndim == 2 and value.shape[1] != lay.dim) or value.ndim > 2:
        raise ValueError(
            f"table {lay.name!r}: array of shape {value.shape} for a {lay.rows} x {lay.dim} table"
        )
    if lay.data_parallel:
        return jax.device_put(value, NamedSharding(mesh, P()))
    trailing = (lay.width,) if value.ndim == 2 else ()
    blocks = np.zeros((len(lay.row_start), lay.slots, lay.rows_per_slot, *trailing), value.dtype)
    for d, s, cells in lay.placements():
        part = value[cells[: value.ndim]]
        blocks[d, s, : len(part)] = part
    return jax.device_put(blocks, NamedSharding(mesh, P(tuple(mesh.axis_names))))


def gather_rows(lay: TableLayout, sharded: jax.Array) -> np.ndarray:
    """The inverse of `shard_rows`, on the host (tests, checkpoints of small tables)."""
    value = np.asarray(sharded)
    if lay.data_parallel:
        return value
    out = np.zeros((lay.rows, lay.dim) if value.ndim == 4 else (lay.rows,), value.dtype)
    for d, s, cells in lay.placements():
        count = cells[0].stop - cells[0].start
        out[cells[: out.ndim]] = value[d, s, :count]
    return out


def shard_tables(
    layouts: Mapping[str, TableLayout], logical: Mapping[str, jax.Array], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """{table: [rows, dim]} -> the sharded storage of each table, placed on `mesh`."""
    return {name: shard_rows(lay, logical[name], mesh) for name, lay in layouts.items()}


def gather_tables(
    layouts: Mapping[str, TableLayout], sharded: Mapping[str, jax.Array]
) -> dict[str, np.ndarray]:
    """{table: [rows, dim]} back from the sharded storage, on the host."""
    return {name: gather_rows(lay, sharded[name]) for name, lay in layouts.items()}


def sharded_lookup(
    layouts: Mapping[str, TableLayout],
    sharded: Mapping[str, jax.Array],
    features: Mapping[str, tuple[str, bool]],
    ids: Mapping[str, jax.Array],
    coef: Mapping[str, jax.Array],
    mesh: jax.sharding.Mesh,
) -> dict[str, jax.Array]:
    """Pooled (or per-position) activations of every feature, batch-sharded.

    Args:
      layouts: from `table_layouts`.
      sharded: from `shard_tables`.
      features: {feature: (table, pooled)}; pooled False keeps one vector per position.
      ids: {feature: [batch, max_ids] int32} row ids, batch sharded over all mesh axes.
      coef: {feature: [batch, max_ids] float32} per-position factors (0 on padding).
      mesh: the mesh.
    Returns:
      {feature: [batch, dim]} (pooled) or [batch, max_ids, dim], float32, batch-sharded.
    """
    axes = _axes(mesh)
    names = sorted(features)
    batch_spec = P(axes)

    def body(tables, ids, coef):
        d = collectives.device_index(axes)
        out = {}
        for f in names:
            table, pooled = features[f]
            lay = layouts[table]
            if lay.data_parallel:
                rows = tables[table][ids[f]].astype(jnp.float32) * coef[f][..., None]
                out[f] = rows.sum(axis=1) if pooled else rows
                continue
            all_ids = collectives.gather_batch(ids[f], axes)  # [batch, L]
            all_coef = collectives.gather_batch(coef[f], axes)
            block = tables[table][0]  # [slots, rows_per_slot, width], this device's shards
            row_start, row_count, col_start = lay.slot_metadata(d)
            shape = (all_ids.shape[0], lay.dim) if pooled else (*all_ids.shape, lay.dim)
            buf = jnp.zeros(shape, jnp.float32)
            for s in range(lay.slots):
                local = all_ids - row_start[s]
                inside = (local >= 0) & (local < row_count[s])
                rows = block[s][jnp.clip(local, 0, lay.rows_per_slot - 1)].astype(jnp.float32)
                part = rows * jnp.where(inside, all_coef, 0.0)[..., None]  # [batch, L, width]
                if pooled:
                    part = part.sum(axis=1)
                start = (0, col_start[s]) if pooled else (0, 0, col_start[s])
                # Slots hold different columns, so each lands in its own place; empty slots add 0.
                buf = buf + jax.lax.dynamic_update_slice(jnp.zeros(shape, jnp.float32), part, start)
            out[f] = collectives.scatter_sum_batch(buf, axes)
        return out

    table_specs = {t: (P() if lay.data_parallel else P(axes)) for t, lay in layouts.items()}
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(table_specs, {f: batch_spec for f in names}, {f: batch_spec for f in names}),
        out_specs={f: batch_spec for f in names},
    )
    return mapped({t: sharded[t] for t in layouts}, {f: ids[f] for f in names}, {f: coef[f] for f in names})


def logical_sharding(rows: int, mesh: jax.sharding.Mesh) -> NamedSharding:
    """How a logical `[rows, ...]` array of a table is held while saved or restored: rows
    split evenly over as many devices as divide them (arrays must shard evenly), the
    rest of the mesh holding copies. Orbax then writes and reads the shards in parallel."""
    devices = mesh.devices.reshape(-1)
    parts = max(g for g in range(1, len(devices) + 1) if len(devices) % g == 0 and rows % g == 0)
    grid = jax.sharding.Mesh(devices.reshape(parts, len(devices) // parts), ("rows", "copies"))
    return NamedSharding(grid, P("rows"))


def to_logical(lay: TableLayout, storage: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    """Sharded storage (table or slot) -> its logical `[rows, dim]` / `[rows]` array, on device."""
    target = logical_sharding(lay.rows, mesh)
    if lay.data_parallel:
        return jax.jit(jnp.copy, out_shardings=target)(storage)

    def build(storage):
        out = jnp.zeros((lay.rows, lay.dim) if storage.ndim == 4 else (lay.rows,), storage.dtype)
        for d, s, cells in lay.placements():
            count = cells[0].stop - cells[0].start
            out = out.at[cells[: out.ndim]].set(storage[d, s, :count])
        return out

    return jax.jit(build, out_shardings=target)(storage)


def from_logical(
    lay: TableLayout, logical: jax.Array, mesh: jax.sharding.Mesh, per_column: bool
) -> jax.Array:
    """The inverse of `to_logical`: a logical array -> this layout's sharded storage."""
    if lay.data_parallel:
        return jax.jit(jnp.copy, out_shardings=NamedSharding(mesh, P()))(logical)

    def build(logical):
        trailing = (lay.width,) if per_column else ()
        out = jnp.zeros((len(lay.row_start), lay.slots, lay.rows_per_slot, *trailing), logical.dtype)
        for d, s, cells in lay.placements():
            part = logical[cells[: logical.ndim]]
            out = out.at[d, s, : part.shape[0]].set(part)
        return out

    return jax.jit(build, out_shardings=NamedSharding(mesh, P(_axes(mesh))))(logical)
