"""Tables laid out on a mesh as a `ShardingPlan` says: stacked groups and their conversions.

Groups. Tables with the same strategy, shard width, dtype and optimizer are stacked into
one group array, so a group is looked up and updated by one fused computation:
- a sharded group (every strategy but data-parallel) is `[devices, block_rows, width]`
  with `PartitionSpec((*mesh axes,), None, None)`: device d's block holds the shards
  the plan gives d, one after another (`Placement.offset` says where), zero-padded to
  the fullest device's rows;
- a data-parallel group is `[total_rows, dim]`, its tables one after another, with
  `PartitionSpec()` (replicated).
Optimizer slots are laid out like their tables (a row-wise slot drops the last axis).

Conversions. `shard_logical` / `gather_logical` move whole tables between the host and
this layout (tests, small models). `mesh.relayout` converts on the devices, for
checkpoints and initialization, between this layout and the logical `[rows, dim]` arrays
split over the devices (`logical_sharding`), so no device ever holds a whole table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mesh.meshes import mesh_spec
from mesh.plan import ShardingPlan, Strategy, validate_plan


@dataclasses.dataclass(frozen=True)
class Placement:
    """One shard of a table inside its group's storage."""

    table: str
    device: int  # global device index; -1 in a data-parallel group (every device)
    rows: tuple[int, int]  # half-open rows of the logical table
    cols: tuple[int, int]  # half-open columns of the logical table
    offset: int  # first row of the shard in its device's block (data-parallel: in the stack)

    @property
    def row_count(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """One stacked group: its tables' placements and its storage shape."""

    name: str
    strategy: Strategy
    width: int  # columns per shard (data-parallel: the dim)
    devices: int
    block_rows: int  # rows per device block (data-parallel: rows of the stack)
    placements: tuple[Placement, ...]
    tables: tuple[str, ...]

    @property
    def data_parallel(self) -> bool:
        return self.strategy is Strategy.DATA_PARALLEL

    def shape(self, per_column: bool = True) -> tuple[int, ...]:
        """Storage shape of the table (per_column) or of a row-wise slot."""
        lead = (self.block_rows,) if self.data_parallel else (self.devices, self.block_rows)
        return (*lead, self.width) if per_column else lead

    def partition_spec(self, axes: tuple[str, ...]) -> P:
        return P() if self.data_parallel else P(axes)

    def sharding(self, mesh: jax.sharding.Mesh) -> NamedSharding:
        return NamedSharding(mesh, self.partition_spec(tuple(mesh.axis_names)))

    def placements_of(self, table: str) -> list[Placement]:
        return [p for p in self.placements if p.table == table]


@dataclasses.dataclass(frozen=True)
class ShardedLayout:
    """Every table's group and placements: static, derived from a plan and a mesh."""

    groups: tuple[GroupLayout, ...]
    table_shapes: Mapping[str, tuple[int, int]]  # {table: (rows, dim)}
    group_of: Mapping[str, str]  # {table: group name}
    # {table: {first row of a shard: the share of the table's ids it serves}} where that
    # is not its share of the rows (a cache's slots stand for more rows: `recsys.cache`).
    id_shares: Mapping[str, Mapping[int, float]] = dataclasses.field(default_factory=dict)

    def id_share(self, p: Placement) -> float:
        """The share of its table's ids a shard is expected to serve (bucket capacities)."""
        shares = self.id_shares.get(p.table, {})
        return shares.get(p.rows[0], p.row_count / self.table_shapes[p.table][0])

    def group(self, name: str) -> GroupLayout:
        return next(g for g in self.groups if g.name == name)

    def table_group(self, table: str) -> GroupLayout:
        return self.group(self.group_of[table])


def _group_key(strategy: Strategy, width: int, table) -> tuple:
    # Tables share a group only when one fused lookup and one optimizer update serve them.
    return (strategy, width, str(getattr(table, "dtype", "float32")), getattr(table, "optimizer", None))


def sharded_layout(plan: ShardingPlan, tables, mesh: jax.sharding.Mesh) -> ShardedLayout:
    """Validates `plan` for `mesh` and stacks its tables into groups.

    Args:
      plan: the sharding plan.
      tables: TableSpecs (name, rows, dim; dtype and optimizer when present separate groups).
      mesh: the mesh.
    """
    spec = mesh_spec(mesh)
    validate_plan(plan, tables, spec)
    n = spec.size
    members: dict[tuple, list] = {}
    for t in tables:
        p = plan.tables[t.name]
        width = p.shards[0].cols[1] - p.shards[0].cols[0]
        members.setdefault(_group_key(p.strategy, width, t), []).append(t)
    groups, group_of = [], {}
    for i, ((strategy, width, *_), group_tables) in enumerate(members.items()):
        name = f"{i}_{strategy.value}_w{width}"
        placements, fill = [], [0] * n
        for t in group_tables:
            group_of[t.name] = name
            if strategy is Strategy.DATA_PARALLEL:
                placements.append(Placement(t.name, -1, (0, t.rows), (0, t.dim), fill[0]))
                fill[0] += t.rows
                continue
            for s in sorted(plan.tables[t.name].shards, key=lambda s: (s.cols, s.rows, s.device)):
                placements.append(Placement(t.name, s.device, s.rows, s.cols, fill[s.device]))
                fill[s.device] += s.rows[1] - s.rows[0]
        groups.append(
            GroupLayout(
                name=name,
                strategy=strategy,
                width=width,
                devices=n,
                block_rows=max(1, max(fill)),
                placements=tuple(placements),
                tables=tuple(t.name for t in group_tables),
            )
        )
    return ShardedLayout(tuple(groups), {t.name: (t.rows, t.dim) for t in tables}, group_of)


def check_shape(table: str, shape: tuple[int, int], value) -> None:
    rows, dim = shape
    if value.ndim not in (1, 2) or value.shape[0] != rows or (value.ndim == 2 and value.shape[1] != dim):
        raise ValueError(f"table {table!r}: array of shape {tuple(value.shape)} for a {rows} x {dim} table")


def _cells(p: Placement, ndim: int):
    """The placement's part of a logical [rows, dim] (or [rows]) array."""
    return (slice(*p.rows), slice(*p.cols))[:ndim]


def _slot(p: Placement):
    """The placement's rows in its group storage."""
    rows = slice(p.offset, p.offset + p.row_count)
    return rows if p.device < 0 else (p.device, rows)


def shard_logical(
    layout: ShardedLayout, logical: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """{table: [rows, dim] or [rows]} on the host -> {group: storage} placed on `mesh`.

    All tables of a group must be given with the same rank (tables, or one slot kind).
    """
    out = {}
    for g in layout.groups:
        values = {t: np.asarray(logical[t]) for t in g.tables}
        for t, v in values.items():
            check_shape(t, layout.table_shapes[t], v)
        ndim = values[g.tables[0]].ndim
        storage = np.zeros(g.shape(ndim == 2), values[g.tables[0]].dtype)
        for p in g.placements:
            storage[_slot(p)] = values[p.table][_cells(p, ndim)]
        out[g.name] = jax.device_put(storage, g.sharding(mesh))
    return out


def gather_logical(layout: ShardedLayout, storage: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
    """The inverse of `shard_logical`, on the host (tests, small tables)."""
    out = {}
    for g in layout.groups:
        value = np.asarray(storage[g.name])
        per_column = value.ndim == len(g.shape(True))
        for t in g.tables:
            rows, dim = layout.table_shapes[t]
            out[t] = np.zeros((rows, dim) if per_column else (rows,), value.dtype)
        for p in g.placements:
            out[p.table][_cells(p, 2 if per_column else 1)] = value[_slot(p)]
    return out


def gather_logical_slots(layout: ShardedLayout, slots) -> dict[str, dict[str, np.ndarray]]:
    """{table: {slot: [rows, ...]}} of groups' optimizer slots ({group: {slot: storage}}),
    gathered to the host (tests, small tables)."""
    out: dict[str, dict[str, np.ndarray]] = {table: {} for table in layout.table_shapes}
    for kind in sorted({k for g in layout.groups for k in slots[g.name]}):
        groups = tuple(g for g in layout.groups if kind in slots[g.name])
        sub = ShardedLayout(groups, layout.table_shapes, layout.group_of)
        for table, value in gather_logical(sub, {g.name: slots[g.name][kind] for g in groups}).items():
            out[table][kind] = value
    return out


def logical_sharding(rows: int, dim: int | None, mesh: jax.sharding.Mesh) -> NamedSharding:
    """How a logical `[rows, dim]` (or `[rows]`) array is held while saved, restored or
    initialized: rows split over as many devices as divide them evenly, columns over as
    many of the rest as divide `dim`; only what neither divides holds copies (a table
    with a prime row count and dim 1, say). Orbax writes and reads the shards in parallel.
    """
    devices = mesh.devices.reshape(-1)
    n = len(devices)
    row_parts = max(g for g in range(1, n + 1) if n % g == 0 and rows % g == 0)
    col_parts = 1
    if dim is not None:
        rest = n // row_parts
        col_parts = max(g for g in range(1, rest + 1) if rest % g == 0 and dim % g == 0)
    grid = jax.sharding.Mesh(
        devices.reshape(row_parts, col_parts, n // (row_parts * col_parts)), ("rows", "cols", "copies")
    )
    return NamedSharding(grid, P("rows", "cols") if dim is not None else P("rows"))
