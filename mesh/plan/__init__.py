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


def column_split(dim: int, parts: int) -> int:
    """The most column shards, at most `parts`, that split `dim` evenly (each >= 1 column)."""
    return max(c for c in range(1, min(parts, dim) + 1) if dim % c == 0)


class _Balancer:
    """Greedy placement: the next shard goes to the least-loaded candidate (ties: lowest index)."""

    def __init__(self, slots: int):
        self.load = [0] * slots

    def place(self, size: int, candidates: Iterable[int] | None = None) -> int:
        candidates = range(len(self.load)) if candidates is None else list(candidates)
        best = min(candidates, key=lambda i: (self.load[i], i))
        self.load[best] += size
        return best


def plan_for_strategy(tables, mesh: MeshSpec, strategy: Strategy | str) -> ShardingPlan:
    """One strategy for every table, placed with greedy size balancing.

    Args:
      tables: TableSpecs (name, rows, dim).
      mesh: the mesh; hybrids use its leading axis as hosts (1 host on a flat mesh).
      strategy: the Strategy for all tables.
    """
    strategy = Strategy(strategy)
    hosts, per_host, n = mesh.hosts, mesh.devices_per_host, mesh.size
    devices, host_load = _Balancer(n), _Balancer(hosts)
    out = {}
    # Largest tables first, so greedy balancing has the most room for the small ones.
    for spec in sorted(tables, key=lambda t: (-t.rows * t.dim, t.name)):
        rows, dim, full_r, full_c = spec.rows, spec.dim, (0, spec.rows), (0, spec.dim)
        if strategy is Strategy.TABLE_WISE:
            shards = [Shard(devices.place(rows * dim), full_r, full_c)]
        elif strategy is Strategy.ROW_WISE:
            shards = [Shard(d, r, full_c) for d, r in enumerate(row_blocks(rows, n)) if r[1] > r[0]]
        elif strategy is Strategy.COLUMN_WISE:
            c = column_split(dim, n)
            width = dim // c
            shards = [
                Shard(devices.place(rows * width), full_r, (k * width, (k + 1) * width)) for k in range(c)
            ]
        elif strategy is Strategy.DATA_PARALLEL:
            shards = [Shard(d, full_r, full_c) for d in range(n)]
        elif strategy is Strategy.TABLE_ROW_WISE:
            h = host_load.place(rows * dim)
            blocks = row_blocks(rows, per_host)
            shards = [Shard(h * per_host + d, r, full_c) for d, r in enumerate(blocks) if r[1] > r[0]]
        elif strategy is Strategy.TABLE_COLUMN_WISE:
            h = host_load.place(rows * dim)
            c = column_split(dim, per_host)
            width = dim // c
            shards = [Shard(h * per_host + k, full_r, (k * width, (k + 1) * width)) for k in range(c)]
        else:  # GRID
            c = column_split(dim, hosts)
            width = dim // c
            shards = [
                Shard(h * per_host + d, r, (h * width, (h + 1) * width))
                for h in range(c)
                for d, r in enumerate(row_blocks(rows, per_host))
                if r[1] > r[0]
            ]
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

    n, per_host = mesh.size, mesh.devices_per_host
    if not p.shards:
        fail("no shards")
    for s in p.shards:
        if not 0 <= s.device < n:
            fail(f"device {s.device} is outside the mesh's {n} devices")
        if s.rows[1] > spec.rows or s.cols[1] > spec.dim:
            fail(f"shard on device {s.device} covers rows {list(s.rows)} cols {list(s.cols)}, past the table")
        if s.size == 0:
            fail(f"shard on device {s.device} is empty")
    full_r, full_c = (0, spec.rows), (0, spec.dim)
    if p.strategy is Strategy.DATA_PARALLEL:
        if sorted(s.device for s in p.shards) != list(range(n)) or any(
            (s.rows, s.cols) != (full_r, full_c) for s in p.shards
        ):
            fail(f"a data-parallel table needs one full shard on each of the {n} devices")
        return
    if sum(s.size for s in p.shards) != spec.rows * spec.dim or not _tiles(p.shards, spec):
        fail("shards overlap or leave part of the table uncovered")

    by_cols: dict[tuple[int, int], list[Shard]] = {}
    for s in p.shards:
        by_cols.setdefault(s.cols, []).append(s)
    widths = {c[1] - c[0] for c in by_cols}
    if len(widths) != 1:
        fail(f"column shards must have equal widths, got {sorted(widths)}")
    host_of = lambda d: d // per_host  # noqa: E731

    def check_row_blocks(shards: list[Shard], first_device: int, parts: int, where: str):
        expected = [(first_device + d, r) for d, r in enumerate(row_blocks(spec.rows, parts)) if r[1] > r[0]]
        got = sorted((s.device, s.rows) for s in shards)
        if got != expected:
            fail(
                f"{where} needs row blocks of {-(-spec.rows // parts)} in device order {expected}, got {got}"
            )

    if p.strategy is Strategy.TABLE_WISE:
        if len(p.shards) != 1:
            fail("a table-wise table is one full shard")
    elif p.strategy is Strategy.ROW_WISE:
        check_row_blocks(p.shards, 0, n, "row-wise")
    elif p.strategy is Strategy.COLUMN_WISE:
        if any(s.rows != full_r for s in p.shards):
            fail("column-wise shards hold all rows")
    elif p.strategy is Strategy.TABLE_ROW_WISE:
        hosts = {host_of(s.device) for s in p.shards}
        if len(hosts) != 1:
            fail(f"a table-row-wise table lives on one host, got hosts {sorted(hosts)}")
        check_row_blocks(p.shards, hosts.pop() * per_host, per_host, "table-row-wise")
    elif p.strategy is Strategy.TABLE_COLUMN_WISE:
        hosts = {host_of(s.device) for s in p.shards}
        if len(hosts) != 1 or any(s.rows != full_r for s in p.shards):
            fail("table-column-wise shards hold all rows on devices of one host")
    else:  # GRID
        for cols, shards in by_cols.items():
            hosts = {host_of(s.device) for s in shards}
            if len(hosts) != 1:
                fail(f"grid column shard {list(cols)} spans hosts {sorted(hosts)}")
            check_row_blocks(shards, hosts.pop() * per_host, per_host, f"grid column shard {list(cols)}")
        if len({host_of(s[0].device) for s in by_cols.values()}) != len(by_cols):
            fail("grid column shards need one host each")


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
