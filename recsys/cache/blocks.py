"""Where a cached table's slots live: its row blocks, and each block's slots in the
device tables.

A cached table is cut into the row blocks its plan gives (one block on one device, or
for a table-wise, column-wise or data-parallel table). Each block has its own cache of
`capacity` slots on the devices that own the block, so no row ever moves between
owners: the device tables hold a "slot table" per cached table, planned like the
logical table with the same owners, whose row block `j` is block `j`'s slots.
"""

from __future__ import annotations

import dataclasses
import math

from mesh.meshes import MeshSpec
from mesh.plan import ShardingPlan, Strategy, TablePlan, shard_placement, strategy_shards
from recsys.specs import EmbeddingConfig, TableSpec


@dataclasses.dataclass(frozen=True)
class CacheBlock:
    """One row block of a cached table and its slots in the slot table."""

    table: str
    index: int  # the block's position among its table's blocks
    rows: tuple[int, int]  # half-open rows of the logical table it caches
    slot_start: int  # its first row in the slot table
    capacity: int  # its slots

    @property
    def row_count(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def name(self) -> str:
        """How errors name the block: the table, and its rows when it has several blocks."""
        return self.table if self.index < 0 else f"{self.table} (rows {self.rows[0]}:{self.rows[1]})"


def block_capacity(factor: float, rows: int) -> int:
    """Slots of a cache holding `factor` of `rows` rows."""
    return max(1, min(rows, math.ceil(factor * rows)))


def whole_table_blocks(spec: TableSpec, factor: float) -> list[CacheBlock]:
    """One block for the whole table (one device)."""
    return [CacheBlock(spec.name, -1, (0, spec.rows), 0, block_capacity(factor, spec.rows))]


def planned_blocks(
    spec: TableSpec, factor: float, table_plan: TablePlan, mesh: MeshSpec
) -> tuple[list[CacheBlock], TablePlan]:
    """(the table's blocks, the plan of its slot table) under `table_plan`.

    Every row block caches `factor` of the largest block's rows, so the slot table
    splits into equal blocks of that size over the same devices as the table.
    """
    strategy = table_plan.strategy
    row_ranges = sorted({s.rows for s in table_plan.shards})
    if not strategy.row_sharded:
        blocks = whole_table_blocks(spec, factor)
        slot_rows = blocks[0].capacity
    else:
        capacity = block_capacity(factor, max(r1 - r0 for r0, r1 in row_ranges))
        owners = mesh.size if strategy is Strategy.ROW_WISE else mesh.devices_per_host
        slot_rows = capacity * owners
        blocks = [
            CacheBlock(spec.name, j, r, j * capacity, min(capacity, r[1] - r[0]))
            for j, r in enumerate(row_ranges)
        ]
    shards = strategy_shards(strategy, slot_rows, spec.dim, mesh, **shard_placement(table_plan, mesh))
    slot_plan = TablePlan(strategy, tuple(shards))
    _check_same_owners(spec.name, blocks, table_plan, slot_plan)
    return blocks, slot_plan


def _check_same_owners(table: str, blocks: list[CacheBlock], table_plan: TablePlan, slot_plan: TablePlan):
    """Each block's slots must sit on the devices (and columns) that own its rows."""
    for block in blocks:
        owners = sorted((s.device, s.cols) for s in table_plan.shards if s.rows == block.rows)
        held = sorted((s.device, s.cols) for s in slot_plan.shards if s.rows[0] == block.slot_start)
        if owners != held:
            raise ValueError(f"table {block.name!r}: its cache would sit on {held}, its rows on {owners}")


def cached_config(config: EmbeddingConfig, blocks: dict[str, list[CacheBlock]], slot_rows: dict[str, int]):
    """`config` as the devices hold it: each cached table has `slot_rows[table]` rows."""
    tables = tuple(
        dataclasses.replace(t, rows=slot_rows[t.name]) if t.name in blocks else t for t in config.tables
    )
    return dataclasses.replace(config, tables=tables)


def slot_plan_of(plan: ShardingPlan, slot_plans: dict[str, TablePlan]) -> ShardingPlan:
    """`plan` with the cached tables' slot tables in place of the tables."""
    return ShardingPlan({**plan.tables, **slot_plans}, plan.mesh)
