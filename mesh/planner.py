"""The sharding planner: per table, the strategy and placement with the fastest step.

The cost model (`mesh.cost`) charges each shard its memory and lookups on its device,
and each group of tables (same strategy, shard width, dtype and optimizer: one stacked
array at run time) its exchanges: static-shape `all_to_all`s that every device sends and
receives in full, padded to the group's busiest owner. So a device's time is its lookups
plus the step's exchanges, the same for every device, and a placement matters twice: for
the lookups each device does and for the busiest owner of each group.

Search (enumerate -> estimate -> place -> regroup -> re-place -> refine):
1. Tables go largest first (by their share of a device's memory plus their lookup time).
2. For each table every allowed strategy is tried: table-wise, column-wise with each
   shard count that divides the dim, row-wise, data-parallel, and the two-level hybrids
   on each host. Shards that may go anywhere (table-wise, column-wise) go, one by one, to
   the device where the step grows least (its lookups, and its group's busiest owner). A
   candidate that overflows a device's memory is skipped; the candidate with the best
   score wins: the step time it implies, the larger of the step now and perfect balance
   of the work placed plus a share of the least work the remaining tables will add (so
   that the first, largest tables do not spread over every device and leave no room),
   ties broken by total time. The pass runs for a few shares (`LOOKAHEADS`) and the
   fastest plan wins.
3. The tables of each group are placed again all under one other strategy (table-wise,
   or column-wise in c shards) when that lowers the step time: a move no single table
   makes, since the first table of a group pays its whole exchange.
4. Each table is placed again, knowing where all the others are, when that lowers the
   step time (or keeps it and lowers the total).
5. Refinement: table-wise and column-wise shards move, one at a time, from the device
   with the most lookups or from a group's busiest owner, where the move lowers the step
   time, or leaves one device fewer with the most lookups (ties are common).
Each group is costed on the route the runtime picks for it (`mesh.routing.RUNTIME_ROUTES`:
broadcast, bucketized rows, or pooled at the owner).
The result reports the estimated step time against two lower bounds: `sum of device
times / devices` (no placement of the chosen shards beats perfect balance) and the
costliest table alone on an empty machine under its best strategy, and the bytes each
device sends per step, which the compiled step reproduces (`tests/test_planner.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from mesh.cost import (
    DeviceLoad,
    GroupTraffic,
    TableLoad,
    data_parallel_lookup_bytes,
    step_seconds,
)
from mesh.meshes import MeshSpec
from mesh.plan import Shard, ShardingPlan, Strategy, TablePlan, column_split, strategy_shards
from mesh.routing import RoutingOptions
from mesh.topology import PRESETS, Topology, format_bytes
from pallas_kernels.fused_update.optimizers import OptimizerKind

PRESET_NAMES = sorted(PRESETS)
# How much of the least work still to place the greedy pass reserves room for (`_place_all`);
# each is one start, and the best plan wins.
LOOKAHEADS = (0.5, 0.8, 1.0, 1.2)
HOSTS_TRIED = 4  # one-host hybrids are tried on this many of the least loaded hosts
_MOVABLE = (Strategy.TABLE_WISE, Strategy.COLUMN_WISE)
_EPS = 1e-9


class PlanningError(ValueError):
    """No plan fits: says which table and how much memory is missing where."""


@dataclasses.dataclass
class _Shard:
    table: str
    strategy: Strategy
    device: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def owner(self) -> tuple[int, tuple[int, int], tuple[int, int]]:
        return self.device, self.rows, self.cols


@dataclasses.dataclass
class PlanResult:
    plan: ShardingPlan
    topology: Topology
    loads: list[DeviceLoad]
    times: list[float]  # seconds per step, per device
    lower_bound: float
    seconds: float  # planning time
    collective_bytes: float = 0.0  # per device and step: every device sends (and receives) this
    table_floor: float = 0.0  # the fastest the costliest table alone can run: also a bound
    groups: list[dict] = dataclasses.field(default_factory=list)  # per group: tables, route, bytes
    # Cached tables: {table: {"load_factor", "hit_rate"}} (`plan_with_cache`), and the bytes
    # each host's memory holds of them (whole rows and optimizer state).
    cache: dict[str, dict] = dataclasses.field(default_factory=dict)
    host_memory: list[float] = dataclasses.field(default_factory=list)
    reserved_bytes: float = 0.0  # per device: the batch's activations

    @property
    def step_time(self) -> float:
        return max(self.times)

    @property
    def balance(self) -> float:
        """Slowest device over the mean (1.0 is perfect)."""
        mean = sum(self.times) / len(self.times)
        return self.step_time / mean if mean else 1.0

    def to_json(self) -> dict:
        out = self.plan.to_json()
        out["estimates"] = {
            "step_time_s": self.step_time,
            "lower_bound_s": self.lower_bound,
            "table_floor_s": self.table_floor,
            "max_over_mean": self.balance,
            "collective_bytes_per_device": self.collective_bytes,
            "groups": self.groups,
            "cache": self.cache,
            "host_memory_bytes": self.host_memory,
            "activation_bytes_per_device": self.reserved_bytes,
            "devices": [
                {
                    "device": d,
                    "memory_bytes": load.memory,
                    "memory_capacity": self.topology.memory,
                    "time_s": t,
                    "sent_bytes": load.sent,
                    "received_bytes": load.received,
                    "host_link_bytes": load.host_bytes,
                }
                for d, (load, t) in enumerate(zip(self.loads, self.times))
            ],
        }
        return out

    def __str__(self) -> str:
        lines = [str(self.plan), "", f"{'group':<28} {'route':<10} {'MB/device':>10}  tables"]
        for g in self.groups:
            name = f"{g['strategy']} w{g['width']}"
            lines.append(f"{name:<28} {g['route']:<10} {g['bytes'] / 1e6:>10.2f}  {' '.join(g['tables'])}")
        lines += ["", f"{'device':>6} {'memory / capacity':>24} {'':>4} {'time (ms)':>9}"]
        shown = (
            range(len(self.loads))
            if len(self.loads) <= 64
            else [*range(32), *range(len(self.loads) - 32, len(self.loads))]
        )
        for d in shown:
            load = self.loads[d]
            lines.append(
                f"{d:>6} {format_bytes(load.memory):>12} / {format_bytes(self.topology.memory):>9} "
                f"{100 * load.memory / self.topology.memory:>3.0f}% {1e3 * self.times[d]:>9.3f}"
            )
        if self.cache:
            lines += ["", f"{'cached table':<20} {'on device':>9} {'hit rate (est.)':>16}"]
            for name, c in sorted(self.cache.items()):
                lines.append(f"{name:<20} {100 * c['load_factor']:>8.1f}% {c['hit_rate']:>16.3f}")
            per_host = ", ".join(f"host {h}: {format_bytes(m)}" for h, m in enumerate(self.host_memory))
            link = max(load.host_bytes for load in self.loads)
            lines.append(
                f"host memory of cached tables: {per_host}; {format_bytes(link)} per step on the busiest host link"
            )
        floor = f", {1e3 * self.table_floor:.3f} ms (costliest table alone)" if self.table_floor else ""
        timing = f", planned in {self.seconds:.2f} s" if self.seconds else ""
        lines.append(
            f"step {1e3 * self.step_time:.3f} ms, lower bound {1e3 * self.lower_bound:.3f} ms (mean){floor}, "
            f"max/mean {self.balance:.3f}, {self.collective_bytes / 1e6:.2f} MB sent per device{timing}"
        )
        return "\n".join(lines)


def _group_key(table: TableLoad, strategy: Strategy, shards: Sequence[_Shard]) -> tuple:
    """The runtime's stacking (`mesh.sharded`): strategy, shard width, dtype, optimizer (its
    state dtype included)."""
    width = table.dim if strategy is Strategy.DATA_PARALLEL else shards[0].cols[1] - shards[0].cols[0]
    return (strategy, width, table.element_bytes, table.optimizer, table.state_bytes)


def _new_group(key: tuple, devices: int) -> GroupTraffic:
    strategy, width, _, optimizer, _ = key
    return GroupTraffic(
        devices,
        width,
        row_sharded=strategy.row_sharded,
        data_parallel=strategy is Strategy.DATA_PARALLEL,
        rowwise_adagrad=optimizer is OptimizerKind.ROWWISE_ADAGRAD,
    )


@dataclasses.dataclass
class _Trial:
    """A state with one more table placed (or one table fewer)."""

    table: np.ndarray  # [devices, 2]: memory, lookup bytes
    key: tuple
    group: GroupTraffic
    group_bytes: float
    comm: float  # bytes each device sends per step, all groups


class _State:
    """Per-device memory and lookups, and every group's exchanges, while placing."""

    def __init__(self, topo: Topology, batch: int, routing: RoutingOptions, reserved: float = 0.0):
        self.topo, self.batch, self.routing = topo, batch, routing
        self.reserved = reserved  # bytes per device the batch's activations take
        self.table = np.zeros((topo.devices, 2))
        self.groups: dict[tuple, GroupTraffic] = {}
        self.sent: dict[tuple, float] = {}

    @property
    def comm(self) -> float:
        return float(sum(self.sent.values()))

    def times(self, table: np.ndarray | None = None, comm: float | None = None) -> np.ndarray:
        t = self.table if table is None else table
        c = self.comm if comm is None else comm
        return step_seconds(t[:, 1], c, c, self.topo)

    def step(self, table: np.ndarray, comm) -> np.ndarray | float:
        """The slowest device: every device pays the same exchanges."""
        return step_seconds(table[:, 1].max(), comm, comm, self.topo)

    def group(self, key: tuple) -> GroupTraffic:
        return self.groups[key].copy() if key in self.groups else _new_group(key, self.topo.devices)

    def trial(self, table: TableLoad, strategy: Strategy, shards: Sequence[_Shard], sign: int = 1) -> _Trial:
        out = self.table.copy()
        if strategy is Strategy.DATA_PARALLEL:
            out += sign * np.array(
                [
                    table.memory(table.rows, table.dim, self.batch),
                    data_parallel_lookup_bytes(table, self.batch)
                    + _host_work(table, self.batch, table.rows, table.dim, self.topo),
                ]
            )
        else:
            cost: dict[tuple[int, int], tuple[float, float]] = {}  # shards of one shape cost alike
            for s in shards:
                shape = (s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])
                if shape not in cost:
                    cost[shape] = (
                        table.memory(*shape, self.batch),
                        _work(table, self.batch, *shape, self.topo),
                    )
            rows = np.array([cost[(s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])] for s in shards])
            np.add.at(out, np.array([s.device for s in shards]), sign * rows)
        key = _group_key(table, strategy, shards)
        group = self.group(key)
        group.add(table, [s.owner for s in shards], sign)
        sent, _ = group.bytes(self.batch, self.routing)
        return _Trial(out, key, group, sent, self.comm - self.sent.get(key, 0.0) + sent)

    def beside_tables(self, comm: float) -> float:
        """Bytes per device that are not tables: the batch's activations and the
        exchanges' send and receive buffers (`comm` bytes sent per step)."""
        return self.reserved + 2 * comm

    @property
    def capacity(self) -> float:
        """Bytes per device left for tables."""
        return self.topo.memory - self.beside_tables(self.comm)

    def fits(self, trial: _Trial) -> bool:
        """No device holds more than its memory."""
        return not (trial.table[:, 0] + self.beside_tables(trial.comm) > self.topo.memory).any()

    def apply(self, trial: _Trial) -> None:
        self.table = trial.table
        self.groups[trial.key] = trial.group
        self.sent[trial.key] = trial.group_bytes

    def loads(self) -> list[DeviceLoad]:
        c = self.comm
        extra = self.beside_tables(c)
        return [DeviceLoad(m + extra, lookup, c, c) for m, lookup in self.table.tolist()]

    def group_report(self, placed) -> list[dict]:
        out = []
        for key, g in self.groups.items():
            if g.tables:
                strategy, width = key[:2]
                members = sorted(n for n, p in placed.items() if p.key == key)
                route = g.bytes(self.batch, self.routing)[1]
                out.append(
                    {
                        "strategy": strategy.value,
                        "width": width,
                        "tables": members,
                        "route": route,
                        "bytes": self.sent[key],
                    }
                )
        return out


@dataclasses.dataclass
class _Placed:
    strategy: Strategy
    shards: list[_Shard]
    key: tuple


def _candidates(table: TableLoad, topo: Topology, allowed: set[Strategy], state: _State):
    """(strategy, shards) for every placement worth trying."""
    k, per_host, hosts = topo.devices, topo.devices_per_host, topo.hosts
    mesh = mesh_for_topology(topo)

    def shards(strategy: Strategy, **placement) -> list[_Shard]:
        geometry = strategy_shards(strategy, table.rows, table.dim, mesh, **placement)
        return [_Shard(table.name, strategy, s.device, s.rows, s.cols) for s in geometry]

    def spread(strategy: Strategy, count: int) -> list[_Shard]:
        """`count` column shards (one: the whole table), each on the device where the step
        grows least: its lookups and its group's busiest owner (distinct devices)."""
        placed = shards(strategy, columns=count, devices=[-1] * count)
        width = table.dim // count
        key = _group_key(table, strategy, placed)
        group = state.group(key)
        group.add_table(table, [s.owner for s in placed])
        others = state.comm - state.sent.get(key, 0.0)
        memory, lookup = (
            table.memory(table.rows, width, state.batch),
            _work(table, state.batch, table.rows, width, topo),
        )
        table_now = state.table.copy()
        for s in placed:
            sent = group.bytes_with_shard_on_each(table, s.rows, state.batch, state.routing)
            slowest = np.maximum(table_now[:, 1].max(), table_now[:, 1] + lookup)
            step = step_seconds(slowest, others + sent, others + sent, topo)
            step[table_now[:, 0] + memory > state.capacity] = np.inf  # would not fit
            step[[x.device for x in placed if x.device >= 0]] = np.inf  # one shard per device
            s.device = int(np.lexsort((table_now[:, 1], step))[0])
            group.add_owners(table, [s.owner])
            table_now[s.device] += (memory, lookup)
        return placed

    if Strategy.TABLE_WISE in allowed:
        yield Strategy.TABLE_WISE, spread(Strategy.TABLE_WISE, 1)
    if Strategy.COLUMN_WISE in allowed:
        for c in sorted(
            {c for c in range(2, min(k, table.dim) + 1) if table.dim % c == 0 and table.dim // c >= 4}
        ):
            yield Strategy.COLUMN_WISE, spread(Strategy.COLUMN_WISE, c)
    if Strategy.ROW_WISE in allowed and k > 1:
        yield Strategy.ROW_WISE, shards(Strategy.ROW_WISE)
    if Strategy.DATA_PARALLEL in allowed:
        yield Strategy.DATA_PARALLEL, shards(Strategy.DATA_PARALLEL)
    if hosts > 1 or per_host > 1:
        # Hosts differ only in their devices' lookups (exchanges involve every device):
        # try the least loaded few.
        load = state.table[:, 1].reshape(hosts, per_host)
        for h in np.lexsort((load.sum(axis=1), load.max(axis=1)))[:HOSTS_TRIED]:
            if Strategy.TABLE_ROW_WISE in allowed and per_host > 1:
                yield Strategy.TABLE_ROW_WISE, shards(Strategy.TABLE_ROW_WISE, hosts=[int(h)])
            c = column_split(table.dim, per_host, min_width=4)
            if Strategy.TABLE_COLUMN_WISE in allowed and c > 1:
                yield (
                    Strategy.TABLE_COLUMN_WISE,
                    shards(Strategy.TABLE_COLUMN_WISE, columns=c, hosts=[int(h)]),
                )
    if Strategy.GRID in allowed and hosts > 1:
        yield Strategy.GRID, shards(Strategy.GRID, columns=column_split(table.dim, hosts, min_width=4))


def _work(table: TableLoad, batch: int, rows: int, cols: int, topo: Topology) -> float:
    """A shard's lookups and, cached, its host traffic, as bytes of device memory traffic
    taking as long (so every placement decision weighs both)."""
    return table.lookup_bytes(batch, rows, cols) + _host_work(table, batch, rows, cols, topo)


def _host_work(table: TableLoad, batch: int, rows: int, cols: int, topo: Topology) -> float:
    return table.host_bytes(batch, rows, cols) * topo.hbm_bandwidth / topo.host_bandwidth


def _score(state: _State, table: np.ndarray, comm: float) -> tuple[float, float]:
    """(step time, total device time) of per-device loads and exchanges."""
    times = state.times(table, comm)
    return float(times.max()), float(times.sum())


def plan_tables(
    tables: Sequence[TableLoad],
    topo: Topology,
    batch: int,
    *,
    routing: RoutingOptions | None = None,
    strategies: dict[str, Sequence[str]] | None = None,
    refine_seconds: float = 5.0,
    max_moves: int | None = None,
    reserved_bytes: float = 0.0,
) -> PlanResult:
    """Plans `tables` for `topo` at global batch `batch`.

    Args:
      strategies: optional {table: allowed strategy names}; default every strategy.
      refine_seconds: time budget of the refinement pass.
      max_moves: a cap on refinement moves instead, for plans that must not depend on
        timing (several processes planning the same run must agree).
      reserved_bytes: device memory per device the batch's activations take
        (`activation_bytes`); the exchanges' buffers are counted as placed.
    Raises:
      PlanningError: a table fits under no allowed strategy; says how much memory is
        missing on which device for its most compact option.
    """
    start = time.perf_counter()
    routing = routing or RoutingOptions()
    if batch % topo.devices:
        raise PlanningError(f"batch {batch} does not split over {topo.devices} devices")

    def weight(t: TableLoad) -> float:  # share of one device's memory, plus its lookup time
        return (
            t.memory(t.rows, t.dim) / topo.memory + t.lookup_bytes(batch, t.rows, t.dim) / topo.hbm_bandwidth
        )

    order = sorted(tables, key=lambda t: (-weight(t), t.name))
    allowed_of = {
        t.name: {Strategy(s) for s in (strategies or {}).get(t.name, [s.value for s in Strategy])}
        for t in tables
    }
    alone = {t.name: _alone(t, topo, allowed_of[t.name], batch, routing, reserved_bytes) for t in tables}
    floor = max(a[0] for a in alone.values())  # no plan beats the costliest table placed alone
    best = None
    for lookahead in LOOKAHEADS:  # a few starts; the fastest (then least total time) wins
        state, placed = _place_all(order, allowed_of, alone, lookahead, batch, topo, routing, reserved_bytes)
        times = state.times()
        score = (float(times.max()), float(times.sum()))
        if best is None or score < best[0]:
            best = (score, state, placed)
    _, state, placed = best
    _regroup(state, placed, order, allowed_of)
    _replace_each(state, placed, order, allowed_of)
    deadline = start + refine_seconds if max_moves is None else float("inf")
    _refine(state, placed, {t.name: t for t in tables}, deadline, max_moves)
    return _result(state, placed, tables, floor, time.perf_counter() - start)


def _result(state: _State, placed: dict[str, _Placed], tables, floor: float, seconds: float) -> PlanResult:
    times = [float(t) for t in state.times()]
    plan = ShardingPlan(
        {
            t.name: TablePlan(
                placed[t.name].strategy,
                tuple(sorted(Shard(s.device, s.rows, s.cols) for s in placed[t.name].shards)),
            )
            for t in tables
        },
        mesh_for_topology(state.topo),
    )
    topo, host = state.topo, np.zeros(state.topo.devices)
    host_memory = np.zeros(topo.hosts)
    for t in tables:
        if not t.cached:
            continue
        held: dict[int, list] = {}  # host -> the shards its devices cache
        for s in placed[t.name].shards:  # data-parallel: one full shard per device
            host[s.device] += t.host_bytes(state.batch, s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])
            held.setdefault(topo.host_of(s.device), []).append(s)
        # A host keeps the rows and columns its devices cache once, with their state.
        for h, shards in held.items():
            rows = max(s.rows[1] for s in shards) - min(s.rows[0] for s in shards)
            cols = max(s.cols[1] for s in shards) - min(s.cols[0] for s in shards)
            host_memory[h] += t.host_memory(rows, cols)
    loads = state.loads()
    for d, load in enumerate(loads):
        load.lookup_bytes -= host[d] * topo.hbm_bandwidth / topo.host_bandwidth
        load.host_bytes = float(host[d])
    return PlanResult(
        plan,
        topo,
        loads,
        times,
        sum(times) / topo.devices,
        seconds,
        state.comm,
        floor,
        state.group_report(placed),
        cache={t.name: {"load_factor": t.cache_factor, "hit_rate": t.hit_rate} for t in tables if t.cached},
        host_memory=[float(m) for m in host_memory],
        reserved_bytes=state.reserved,
    )


def _placed_from(plan: ShardingPlan, tables: Sequence[TableLoad]) -> dict[str, _Placed]:
    out = {}
    for t in tables:
        p = plan.tables[t.name]
        shards = [_Shard(t.name, p.strategy, s.device, s.rows, s.cols) for s in p.shards]
        out[t.name] = _Placed(p.strategy, shards, _group_key(t, p.strategy, shards))
    return out


def evaluate_plan(
    plan: ShardingPlan,
    tables: Sequence[TableLoad],
    topo: Topology,
    batch: int,
    routing: RoutingOptions | None = None,
    reserved_bytes: float = 0.0,
) -> PlanResult:
    """The cost model's estimates for any plan (a hand-written one, a naive baseline)."""
    state = _State(topo, batch, routing or RoutingOptions(), reserved_bytes)
    placed = _placed_from(plan, tables)
    for t in tables:
        state.apply(state.trial(t, placed[t.name].strategy, placed[t.name].shards))
    return _result(state, placed, tables, 0.0, 0.0)


def step_bytes(
    plan: ShardingPlan,
    tables: Sequence[TableLoad],
    devices: int,
    batch: int,
    routing: RoutingOptions | None = None,
) -> float:
    """Bytes each device sends per step over the embedding exchanges of `plan` (the dense
    layers' all-reduce not included): `evaluate_plan`'s, for a flat mesh of `devices`."""
    topo = Topology(hosts=1, devices_per_host=devices, memory=float("inf"), hbm_bandwidth=1.0,
                    intra_bandwidth=1.0, inter_bandwidth=1.0)  # fmt: skip
    return evaluate_plan(plan, tables, topo, batch, routing).collective_bytes


def _alone(
    table: TableLoad, topo: Topology, allowed, batch: int, routing: RoutingOptions, reserved: float
) -> tuple[float, float]:
    """`table` on an otherwise empty machine: the step time under its best strategy, and
    the least total device time (summed over devices) any strategy costs."""
    empty = _State(topo, batch, routing, reserved)
    best, least = float("inf"), float("inf")
    for strategy, shards in _candidates(table, topo, allowed, empty):
        trial = empty.trial(table, strategy, shards)
        if empty.fits(trial):
            step, total = _score(empty, trial.table, trial.comm)
            best, least = min(best, step), min(least, total)
    return (0.0, 0.0) if best == float("inf") else (best, least)


def _place_all(order, allowed_of, alone, lookahead: float, batch, topo: Topology, routing, reserved: float):
    """The greedy pass: each table, in `order`, under the strategy and on the devices that
    give the best score. A score is the step time the placement implies: no sooner than
    the slowest device now, nor than perfect balance of the work placed plus `lookahead`
    times the least the tables still to place will add (a candidate that spreads work over
    every device must leave room for them). Returns (state, {table: placement})."""
    state = _State(topo, batch, routing, reserved)
    placed: dict[str, _Placed] = {}
    remaining = sum(a[1] for a in alone.values())
    for table in order:
        allowed = allowed_of[table.name]
        remaining -= alone[table.name][1]
        best, shortfall = None, None
        for strategy, shards in _candidates(table, topo, allowed, state):
            trial = state.trial(table, strategy, shards)
            if not state.fits(trial):
                worst = int(np.argmax(trial.table[:, 0]))
                missing = trial.table[worst, 0] + state.beside_tables(trial.comm) - topo.memory
                if shortfall is None or missing < shortfall[0]:
                    shortfall = (missing, worst, strategy)
                continue
            step, total = _score(state, trial.table, trial.comm)
            score = (max(step, (total + lookahead * remaining) / topo.devices), total)
            if best is None or score < best[0]:
                best = (score, strategy, shards, trial)
        if best is None:
            if shortfall is None:
                raise PlanningError(
                    f"table {table.name!r}: none of the allowed strategies {sorted(s.value for s in allowed)} applies"
                )
            missing, device, strategy = shortfall
            raise PlanningError(
                f"table {table.name!r} ({table.rows} x {table.dim}, {format_bytes(table.memory(table.rows, table.dim, batch))} "
                f"with optimizer state) does not fit: its most compact option ({strategy.value}) needs "
                f"{format_bytes(missing)} more on device {device} (capacity {format_bytes(topo.memory)} per device, "
                f"{format_bytes(state.reserved)} of it for the batch's activations)"
            )
        _, strategy, shards, trial = best
        state.apply(trial)
        placed[table.name] = _Placed(strategy, shards, trial.key)
    return state, placed


def _regroup(state: _State, placed, order, allowed_of) -> None:
    """Places the tables of each group again, all under one other strategy (table-wise, or
    column-wise in c shards). One table at a time never makes that move: the first table
    of a new group pays the group's whole exchange, which the next ones share."""
    options = [(Strategy.TABLE_WISE, None)] + [(Strategy.COLUMN_WISE, c) for c in (2, 4, 8, 16, 32)]
    for key in list(state.groups):
        members = [t for t in order if placed[t.name].key == key]
        if len(members) < 2:
            continue
        current = _score(state, state.table, state.comm)
        saved = (state.table.copy(), dict(state.groups), dict(state.sent), dict(placed))
        best = (current, None)
        for strategy, count in options:
            for t in members:
                p = placed[t.name]
                state.apply(state.trial(t, p.strategy, p.shards, sign=-1))
            trial_placed, ok = {}, True
            for t in members:
                choices = [
                    (st, shards)
                    for st, shards in _candidates(t, state.topo, allowed_of[t.name] & {strategy}, state)
                    if count is None or len(shards) == count
                ]
                scored = []
                for st, shards in choices:
                    trial = state.trial(t, st, shards)
                    if state.fits(trial):
                        scored.append((_score(state, trial.table, trial.comm), st, shards, trial))
                if not scored:
                    ok = False
                    break
                _, st, shards, trial = min(scored, key=lambda x: x[0])
                state.apply(trial)
                trial_placed[t.name] = _Placed(st, shards, trial.key)
            score = _score(state, state.table, state.comm) if ok else None
            if ok and (score[0] < best[0][0] * (1 - _EPS)):
                best = (
                    score,
                    (state.table.copy(), dict(state.groups), dict(state.sent), {**placed, **trial_placed}),
                )
            state.table, state.groups, state.sent = saved[0].copy(), dict(saved[1]), dict(saved[2])
            placed.clear()
            placed.update(saved[3])
        if best[1] is not None:
            state.table, state.groups, state.sent = best[1][0], best[1][1], best[1][2]
            placed.clear()
            placed.update(best[1][3])


def _replace_each(state: _State, placed, order, allowed_of, passes: int = 2) -> None:
    """Places every table again, largest first, knowing where all the others are (the
    first pass chose before the smaller tables were placed); keeps a new placement only
    when it lowers the step time, or keeps it and lowers the total device time."""
    for _ in range(passes):
        changed = False
        for table in order:
            p = placed[table.name]
            current = _score(state, state.table, state.comm)
            state.apply(state.trial(table, p.strategy, p.shards, sign=-1))
            best = (current, None)
            for strategy, shards in _candidates(table, state.topo, allowed_of[table.name], state):
                trial = state.trial(table, strategy, shards)
                if not state.fits(trial):
                    continue
                score = _score(state, trial.table, trial.comm)
                if score[0] < best[0][0] * (1 - _EPS) or (
                    score[0] <= best[0][0] and score[1] < best[0][1] * (1 - _EPS)
                ):
                    best = (score, (strategy, shards, trial))
            if best[1] is None:
                state.apply(state.trial(table, p.strategy, p.shards))
                continue
            strategy, shards, trial = best[1]
            state.apply(trial)
            placed[table.name] = _Placed(strategy, shards, trial.key)
            changed = True
        if not changed:
            return


def _refine(state: _State, placed, tables, deadline: float, max_moves: int | None) -> None:
    """Moves table-wise and column-wise shards, one at a time, off the device with the
    most lookups or off a group's busiest owner, while a move lowers the step time or
    leaves one device fewer with the most lookups (without raising the step)."""
    topo, moves = state.topo, 0
    while time.perf_counter() < deadline and (max_moves is None or moves < max_moves):
        moves += 1
        lookups = state.table[:, 1]
        busiest = int(np.argmax(lookups))
        step = float(state.step(state.table, state.comm))
        best = None
        for name, p in placed.items():
            if p.strategy not in _MOVABLE:
                continue
            table, group = tables[name], state.groups[p.key]
            tops = {
                int(np.argmax(group.columns)),
                int(np.argmax(group.outputs)),
                busiest,
            }
            busy = {s.device for s in p.shards}
            for s in p.shards:
                if s.device not in tops:
                    continue
                r, c = s.rows[1] - s.rows[0], s.cols[1] - s.cols[0]
                delta = np.array([table.memory(r, c, state.batch), _work(table, state.batch, r, c, topo)])
                without = state.table.copy()
                without[s.device] -= delta
                g = group.copy()
                g.add_owners(table, [s.owner], sign=-1)
                sent = g.bytes_with_shard_on_each(table, s.rows, state.batch, state.routing)
                comm = state.comm - state.sent[p.key] + sent
                moved = without[:, 1] + delta[1]  # each destination's lookups after the move
                new_step = step_seconds(np.maximum(without[:, 1].max(), moved), comm, comm, topo)
                fits = without[:, 0] + delta[0] <= state.capacity
                for d in np.flatnonzero(fits):
                    d = int(d)
                    if d in busy:
                        continue
                    lower = new_step[d] < step * (1 - _EPS)
                    fewer = (
                        new_step[d] <= step * (1 + _EPS)
                        and s.device == busiest
                        and max(moved[d], without[s.device, 1]) < lookups[busiest] * (1 - _EPS)
                    )
                    if (lower or fewer) and (best is None or new_step[d] < best[0]):
                        best = (float(new_step[d]), name, s, d)
        if best is None:
            return
        _, name, s, d = best
        p = placed[name]
        state.apply(state.trial(tables[name], p.strategy, p.shards, sign=-1))
        s.device = d
        state.apply(state.trial(tables[name], p.strategy, p.shards))


def mesh_for_topology(topo: Topology) -> MeshSpec:
    """The mesh a plan for `topo` runs on: host x device, or flat on one host."""
    if topo.hosts > 1:
        return MeshSpec((("host", topo.hosts), ("device", topo.devices_per_host)))
    return MeshSpec.flat(topo.devices)


def topology_for_mesh(
    spec: MeshSpec, platform: str, device_memory: float | None, measured: Topology | None = None
) -> Topology:
    """The topology of a run's mesh: its hosts and devices; memory and bandwidths from
    `measured` (a calibration or a given spec) when there is one, else memory as the
    devices report it and bandwidths from the platform's preset (cpu, or h100 / tpu-v5e
    figures)."""
    if measured is not None:
        return dataclasses.replace(
            measured,
            name=f"{measured.name or 'measured'} on mesh {spec}",
            hosts=spec.hosts,
            devices_per_host=spec.devices_per_host,
        )
    preset = dict(PRESETS[{"gpu": "h100", "tpu": "tpu-v5e"}.get(platform, "cpu")])
    preset.update(hosts=spec.hosts, devices_per_host=spec.devices_per_host)
    if device_memory:
        preset["memory"] = float(device_memory)
    return Topology(name=f"{platform} mesh {spec}", **preset)
