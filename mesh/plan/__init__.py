"""Sharding plans: which device holds which rows and columns of every table.

A `ShardingPlan` maps each table to a `Strategy` and its shards. It is data: the planner
or a user writes it, `plan_for_strategy` builds the uniform plans, and the sharded layout
follows from it. `validate_plan` checks a plan against the tables and the mesh.

JSON schema (read by tools outside the project; keep it stable):

    {"mesh": {"host": 2, "device": 4},                       # optional: axis sizes
     "tables": {
       "<table name>": {
         "strategy": "table_wise" | "row_wise" | "column_wise" | "data_parallel" |
                     "table_row_wise" | "table_column_wise" | "grid",
         "shards": [{"device": D, "rows": [r0, r1], "cols": [c0, c1]}, ...]
       }, ...}}

`D` is a global device index (the position in the mesh's row-major device array, so
host * devices_per_host + device), ranges are half-open, and a data-parallel table
lists one full shard per device. Shards of the other strategies tile the table exactly.

Worked examples on a host=2,device=4 mesh (8 devices), a table of 10 rows x 16 columns:
- row_wise: blocks of ceil(10 / 8) = 2 rows on devices 0-4 ("10 rows over 8 devices ->
  2,2,2,2,2,0,0,0"); devices 5-7 hold no rows of it.
- table_row_wise on host 1: blocks of ceil(10 / 4) = 3 rows on devices 4-7 -> 3,3,3,1.
- column_wise: as many equal column shards as divide the dim, up to the device count:
  16 columns over 8 devices -> 8 shards of 2 columns, each placed like a table-wise table.
- grid with 2 column shards: columns [0:8] row-wise over host 0's devices, [8:16] over
  host 1's.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Iterable, Mapping

from mesh.meshes import MeshSpec


class Strategy(str, enum.Enum):
    TABLE_WISE = "table_wise"  # the whole table on one device
    ROW_WISE = "row_wise"  # equal row blocks across all devices
    COLUMN_WISE = "column_wise"  # equal column shards, each placed like a table-wise table
    DATA_PARALLEL = "data_parallel"  # replicated on every device, gradients all-reduced
    TABLE_ROW_WISE = "table_row_wise"  # one host owns it, row blocks across its devices
    TABLE_COLUMN_WISE = "table_column_wise"  # one host owns it, column shards across its devices
    GRID = "grid"  # column shards across hosts, row blocks within each host

    @property
    def row_sharded(self) -> bool:
        """A table's rows are split into blocks on several devices (bucketized routes apply)."""
        return self in (Strategy.ROW_WISE, Strategy.TABLE_ROW_WISE, Strategy.GRID)

    @property
    def column_split(self) -> bool:
        """A table's columns are split into shards on several devices."""
        return self in (Strategy.COLUMN_WISE, Strategy.TABLE_COLUMN_WISE, Strategy.GRID)


@dataclasses.dataclass(frozen=True, order=True)
class Shard:
    device: int
    rows: tuple[int, int]  # half-open [r0, r1)
    cols: tuple[int, int]  # half-open [c0, c1)

    @property
    def size(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])

    def to_json(self) -> dict:
        return {"device": self.device, "rows": list(self.rows), "cols": list(self.cols)}


@dataclasses.dataclass(frozen=True)
class TablePlan:
    strategy: Strategy
    shards: tuple[Shard, ...]

    def __post_init__(self):
        object.__setattr__(self, "strategy", Strategy(self.strategy))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    tables: Mapping[str, TablePlan]
    mesh: MeshSpec | None = None

    def to_json(self) -> dict:
        out = {}
        if self.mesh is not None:
            out["mesh"] = dict(self.mesh.axes)
        out["tables"] = {
            name: {"strategy": p.strategy.value, "shards": [s.to_json() for s in p.shards]}
            for name, p in self.tables.items()
        }
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, data: dict | str) -> ShardingPlan:
        """From the JSON schema above; malformed input raises a ValueError saying where."""
        if isinstance(data, str):
            data = json.loads(data)
        if not isinstance(data, dict) or not isinstance(data.get("tables"), dict):
            raise ValueError('a sharding plan is a JSON object with a "tables" object')
        mesh = None
        if "mesh" in data:
            mesh = MeshSpec(tuple((str(k), int(v)) for k, v in data["mesh"].items()))
        tables = {}
        for name, entry in data["tables"].items():
            try:
                strategy = Strategy(entry["strategy"])
            except (KeyError, TypeError, ValueError):
                choices = ", ".join(s.value for s in Strategy)
                raise ValueError(f"table {name!r}: strategy must be one of {choices}") from None
            shards = []
            for i, s in enumerate(entry.get("shards") or []):
                try:
                    shard = Shard(int(s["device"]), _range(s["rows"]), _range(s["cols"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise ValueError(
                        f"table {name!r} shard {i}: expected device, rows [r0, r1], cols [c0, c1] ({e})"
                    ) from None
                shards.append(shard)
            tables[name] = TablePlan(strategy, tuple(shards))
        return cls(tables, mesh)

    def __str__(self) -> str:
        """A readable table: one line per table, its strategy and shard placement."""
        lines = [f"{'table':<16} {'strategy':<18} shards (device: rows x cols)"]
        for name, p in self.tables.items():
            shards = " ".join(
                f"d{s.device}:{s.rows[0]}-{s.rows[1]}x{s.cols[0]}-{s.cols[1]}" for s in p.shards
            )
            if p.strategy is Strategy.DATA_PARALLEL:
                shards = f"all {len(p.shards)} devices (full copies)"
            lines.append(f"{name:<16} {p.strategy.value:<18} {shards}")
        return "\n".join(lines)

    def device_bytes(self, table_bytes_per_element: Mapping[str, int]) -> dict[int, int]:
        """{device: bytes of table shards it holds}."""
        out: dict[int, int] = {}
        for name, p in self.tables.items():
            for s in p.shards:
                out[s.device] = out.get(s.device, 0) + s.size * table_bytes_per_element[name]
        return out


def _range(value) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    if lo < 0 or hi < lo:
        raise ValueError(f"range {list(value)} is not [lo, hi) with 0 <= lo <= hi")
    return lo, hi


def row_blocks(rows: int, parts: int) -> list[tuple[int, int]]:
    """Equal blocks of ceil(rows / parts) rows; the tail may be short or empty.

    >>> row_blocks(10, 4)
    [(0, 3), (3, 6), (6, 9), (9, 10)]
    >>> row_blocks(3, 4)
    [(0, 1), (1, 2), (2, 3), (3, 3)]
    """
    block = -(-rows // parts)
    return [(min(i * block, rows), min((i + 1) * block, rows)) for i in range(parts)]


def column_split(dim: int, parts: int, min_width: int = 1) -> int:
    """The most column shards, at most `parts`, that split `dim` evenly into shards of at
    least `min_width` columns (1 if none does).

    >>> column_split(16, 8), column_split(12, 8), column_split(16, 8, min_width=4)
    (8, 6, 4)
    """
    return max(c for c in range(1, min(parts, dim) + 1) if dim % c == 0 and (dim // c >= min_width or c == 1))


class _Balancer:
    """Greedy placement: the next shard goes to the least-loaded candidate (ties: lowest index)."""

    def __init__(self, slots: int):
        self.load = [0] * slots

    def place(self, size: int, candidates: Iterable[int] | None = None) -> int:
        candidates = range(len(self.load)) if candidates is None else list(candidates)
        best = min(candidates, key=lambda i: (self.load[i], i))
        self.load[best] += size
        return best


def strategy_shards(
    strategy: Strategy | str,
    rows: int,
    dim: int,
    mesh: MeshSpec,
    *,
    columns: int | None = None,
    devices: list[int] | None = None,
    hosts: list[int] | None = None,
) -> list[Shard]:
    """The shards of a `rows x dim` table under `strategy`: the one statement of every
    strategy's geometry, which plans, the planner and validation share.

    Args:
      columns: column shards (column_wise: `column_split(dim, devices)`; table_column_wise:
        `column_split(dim, devices per host)`; grid: `column_split(dim, hosts)`).
      devices: table_wise: its device; column_wise and table_column_wise: the device of
        each column shard (table_column_wise default: the host's first devices in order).
      hosts: table_row_wise and table_column_wise: [its host]; grid: the host of each
        column shard (default: hosts in order).

    >>> [(s.device, s.rows) for s in strategy_shards("table_row_wise", 10, 4, MeshSpec.parse("host=2,device=4"), hosts=[1])]
    [(4, (0, 3)), (5, (3, 6)), (6, (6, 9)), (7, (9, 10))]
    """
    strategy = Strategy(strategy)
    n, per_host = mesh.size, mesh.devices_per_host
    full_r, full_c = (0, rows), (0, dim)
    if strategy is Strategy.TABLE_WISE:
        return [Shard(devices[0], full_r, full_c)]
    if strategy is Strategy.DATA_PARALLEL:
        return [Shard(d, full_r, full_c) for d in range(n)]
    if strategy is Strategy.ROW_WISE:
        return _row_blocks(rows, full_c, range(n))
    base = hosts[0] * per_host if hosts else 0
    if strategy is Strategy.TABLE_ROW_WISE:
        return _row_blocks(rows, full_c, range(base, base + per_host))
    if strategy is Strategy.GRID:
        c = columns or column_split(dim, mesh.hosts)
        width, hosts = dim // c, hosts or list(range(c))
        return [
            shard
            for k in range(c)
            for shard in _row_blocks(
                rows, (k * width, (k + 1) * width), range(hosts[k] * per_host, (hosts[k] + 1) * per_host)
            )
        ]
    parts = per_host if strategy is Strategy.TABLE_COLUMN_WISE else n
    c = columns or column_split(dim, parts)
    width = dim // c
    devices = devices or [base + k for k in range(c)]
    return [Shard(devices[k], full_r, (k * width, (k + 1) * width)) for k in range(c)]


def _row_blocks(rows: int, cols: tuple[int, int], devices: range) -> list[Shard]:
    """Row blocks of `rows` over `devices` in order (`row_blocks`); empty blocks left out."""
    return [Shard(d, r, cols) for d, r in zip(devices, row_blocks(rows, len(devices))) if r[1] > r[0]]


def plan_for_strategy(tables, mesh: MeshSpec, strategy: Strategy | str) -> ShardingPlan:
    """One strategy for every table, placed with greedy size balancing.

    Args:
      tables: TableSpecs (name, rows, dim).
      mesh: the mesh; hybrids use its leading axis as hosts (1 host on a flat mesh).
      strategy: the Strategy for all tables.
    """
    strategy = Strategy(strategy)
    devices, host_load = _Balancer(mesh.size), _Balancer(mesh.hosts)
    out = {}
    # Largest tables first, so greedy balancing has the most room for the small ones.
    for spec in sorted(tables, key=lambda t: (-t.rows * t.dim, t.name)):
        size, placement = spec.rows * spec.dim, {}
        if strategy is Strategy.TABLE_WISE:
            placement["devices"] = [devices.place(size)]
        elif strategy is Strategy.COLUMN_WISE:
            c = column_split(spec.dim, mesh.size)
            placement["devices"] = [devices.place(size // c) for _ in range(c)]
        elif strategy in (Strategy.TABLE_ROW_WISE, Strategy.TABLE_COLUMN_WISE):
            placement["hosts"] = [host_load.place(size)]
        shards = strategy_shards(strategy, spec.rows, spec.dim, mesh, **placement)
        out[spec.name] = TablePlan(strategy, tuple(shards))
    return ShardingPlan({t.name: out[t.name] for t in tables}, mesh)


def validate_plan(plan: ShardingPlan, tables, mesh: MeshSpec) -> None:
    """Raises ValueError naming the table and the problem if `plan` does not fit.

    Checks: every table planned and no unknown ones; device indices inside the mesh;
    shards that tile the table exactly (data-parallel: one full copy per device); and the
    regular structure the stacked layout needs for the strategy (equal row blocks in
    device order, equal column widths, one host for the table-* hybrids, ...).
    """
    specs = {t.name: t for t in tables}
    unknown = sorted(set(plan.tables) - set(specs))
    missing = sorted(set(specs) - set(plan.tables))
    if unknown or missing:
        raise ValueError(f"sharding plan: unknown tables {unknown}, tables without a plan {missing}")
    if plan.mesh is not None and plan.mesh.shape != mesh.shape:
        raise ValueError(f"sharding plan was made for mesh {plan.mesh}, this mesh is {mesh}")
    for name, table_plan in plan.tables.items():
        _validate_table(name, table_plan, specs[name], mesh)


def _validate_table(name: str, p: TablePlan, spec, mesh: MeshSpec) -> None:
    def fail(message: str):
        raise ValueError(
            f"sharding plan, table {name!r} ({spec.rows} x {spec.dim}, {p.strategy.value}): {message}"
        )

    n = mesh.size
    if not p.shards:
        fail("no shards")
    for s in p.shards:
        if not 0 <= s.device < n:
            fail(f"device {s.device} is outside the mesh's {n} devices")
        if s.rows[1] > spec.rows or s.cols[1] > spec.dim:
            fail(f"shard on device {s.device} covers rows {list(s.rows)} cols {list(s.cols)}, past the table")
        if s.size == 0:
            fail(f"shard on device {s.device} is empty")
    if p.strategy is Strategy.DATA_PARALLEL:
        if sorted(p.shards) != strategy_shards(p.strategy, spec.rows, spec.dim, mesh):
            fail(f"a data-parallel table needs one full shard on each of the {n} devices")
        return
    if sum(s.size for s in p.shards) != spec.rows * spec.dim or not _tiles(p.shards, spec):
        fail("shards overlap or leave part of the table uncovered")
    by_cols = _by_columns(p.shards)
    widths = {c[1] - c[0] for c in by_cols}
    if len(widths) != 1:
        fail(f"column shards must have equal widths, got {sorted(widths)}")
    problem = _placement_problem(p.strategy, by_cols, mesh.devices_per_host)
    if problem:
        fail(problem)
    expected = strategy_shards(p.strategy, spec.rows, spec.dim, mesh, **shard_placement(p, mesh))
    if sorted(p.shards) != sorted(expected):
        fail(_expected_layout(p.strategy, spec.rows, mesh, expected, p.shards))


def shard_placement(p: TablePlan, mesh: MeshSpec) -> dict:
    """The `strategy_shards` arguments that place a table's shards as `p` does: its column
    shards' count, and each one's first device and host."""
    by_cols = _by_columns(p.shards)
    return {
        "columns": len(by_cols),
        "devices": [shards[0].device for shards in by_cols.values()],
        "hosts": [shards[0].device // mesh.devices_per_host for shards in by_cols.values()],
    }


def _by_columns(shards) -> dict[tuple[int, int], list[Shard]]:
    """{column range: its shards in row order}, column ranges in order."""
    by_cols: dict[tuple[int, int], list[Shard]] = {}
    for s in sorted(shards, key=lambda s: (s.cols, s.rows)):
        by_cols.setdefault(s.cols, []).append(s)
    return by_cols


def _placement_problem(strategy: Strategy, by_cols: dict, per_host: int) -> str | None:
    """What breaks the hybrids' rule of hosts, if anything."""
    hosts_of = [sorted({s.device // per_host for s in shards}) for shards in by_cols.values()]
    if strategy in (Strategy.TABLE_ROW_WISE, Strategy.TABLE_COLUMN_WISE):
        hosts = sorted({h for hs in hosts_of for h in hs})
        if len(hosts) != 1:
            return f"a {strategy.value.replace('_', '-')} table lives on one host, got hosts {hosts}"
    if strategy is Strategy.GRID:
        for cols, hosts in zip(by_cols, hosts_of):
            if len(hosts) != 1:
                return f"grid column shard {list(cols)} spans hosts {hosts}"
        if len({hosts[0] for hosts in hosts_of}) != len(hosts_of):
            return "grid column shards need one host each"
    return None


def _expected_layout(strategy: Strategy, rows: int, mesh: MeshSpec, expected, got) -> str:
    where = strategy.value.replace("_", "-")
    if strategy.row_sharded:
        parts = mesh.size if strategy is Strategy.ROW_WISE else mesh.devices_per_host
        want = sorted((s.device, s.rows) for s in expected)
        return f"{where} needs row blocks of {-(-rows // parts)} in device order {want}, got {sorted((s.device, s.rows) for s in got)}"
    if strategy is Strategy.TABLE_WISE:
        return "a table-wise table is one full shard"
    return f"{where} shards hold all rows, in equal column shards: expected {sorted(expected)}, got {sorted(got)}"


def _tiles(shards, spec) -> bool:
    """True if the shards cover every cell of the table exactly once (sizes already add up)."""
    row_cuts = sorted({0, spec.rows, *(r for s in shards for r in s.rows)})
    col_cuts = sorted({0, spec.dim, *(c for s in shards for c in s.cols)})
    for r0, r1 in zip(row_cuts, row_cuts[1:]):
        for c0, c1 in zip(col_cuts, col_cuts[1:]):
            covering = sum(
                1
                for s in shards
                if s.rows[0] <= r0 and r1 <= s.rows[1] and s.cols[0] <= c0 and c1 <= s.cols[1]
            )
            if covering != 1:
                return False
    return True
