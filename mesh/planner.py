"""The sharding planner: per table, the strategy and placement with the fastest step.

Search (enumerate -> estimate -> place -> re-place -> refine):
1. Tables go largest first (by their share of a device's memory plus their lookup time).
2. For each table every allowed strategy is tried: table-wise on each device, column-wise
   with each shard count that divides the dim, row-wise, data-parallel, and the two-level
   hybrids on each host. Shards that may go anywhere (table-wise, column-wise) go to the
   device where they raise the step time least. A candidate that overflows a device's
   memory is skipped; the candidate with the best score wins: the step time it implies,
   the larger of the slowest device (`mesh.cost.device_time`) and perfect balance of the
   work placed plus a share of the least work the remaining tables will add (so that the
   first, largest tables do not spread over every device and leave no room), ties broken
   by total time. The pass runs for a few shares (`LOOKAHEADS`) and the fastest plan wins.
3. Each table is placed again, knowing where all the others are, when that lowers the
   step time (or keeps it and lowers the total).
4. Refinement: while the slowest device holds a movable shard (table-wise or column-wise)
   whose move to another device takes it below the slowest time without making the
   destination as slow, move the best one (ties for the slowest are common, so a move
   that leaves one device fewer that slow counts as progress).
Routes: each row-sharded table is costed on the route the runtime would pick for it
(`mesh.cost.ROUTES`: broadcast, bucketized rows, or pooled at the owner).
The result reports the estimated step time against two lower bounds: `sum of device
times / devices` (no placement of the chosen shards beats perfect balance) and the
costliest table alone on an empty machine under its best strategy. It also reports the
bytes a device sends as the compiled step moves them (`step_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import numpy as np

from mesh.cost import CommSettings, DeviceLoad, TableLoad, data_parallel_load, shard_loads, step_seconds
from mesh.meshes import MeshSpec
from mesh.plan import Shard, ShardingPlan, Strategy, TablePlan, row_blocks
from mesh.topology import PRESETS, Topology

PRESET_NAMES = sorted(PRESETS)
# How much of the least work still to place the greedy pass reserves room for (`_place_all`);
# each is one start, and the best plan wins.
LOOKAHEADS = (0.5, 0.8, 1.0, 1.2)


class PlanningError(ValueError):
    """No plan fits: says which table and how much memory is missing where."""


@dataclasses.dataclass
class _Shard:
    table: str
    strategy: Strategy
    device: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    movable: bool


@dataclasses.dataclass
class PlanResult:
    plan: ShardingPlan
    topology: Topology
    loads: list[DeviceLoad]
    times: list[float]  # seconds per step, per device
    lower_bound: float
    seconds: float  # planning time
    collective_bytes: float = 0.0  # per device and step, as compiled (`step_bytes`)
    table_floor: float = 0.0  # the fastest the costliest table alone can run: also a bound

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
            "devices": [
                {
                    "device": d,
                    "memory_bytes": load.memory,
                    "memory_capacity": self.topology.memory,
                    "time_s": t,
                    "sent_bytes": load.sent,
                    "received_bytes": load.received,
                }
                for d, (load, t) in enumerate(zip(self.loads, self.times))
            ],
        }
        return out

    def __str__(self) -> str:
        lines = [str(self.plan), "", f"{'device':>6} {'memory / capacity':>24} {'time (ms)':>10}"]
        shown = (
            range(len(self.loads))
            if len(self.loads) <= 64
            else [*range(32), *range(len(self.loads) - 32, len(self.loads))]
        )
        for d in shown:
            load = self.loads[d]
            lines.append(
                f"{d:>6} {load.memory / 1e9:>10.2f} / {self.topology.memory / 1e9:>7.1f} GB "
                f"{100 * load.memory / self.topology.memory:>3.0f}% {1e3 * self.times[d]:>9.3f}"
            )
        floor = f", {1e3 * self.table_floor:.3f} ms (costliest table alone)" if self.table_floor else ""
        timing = f", planned in {self.seconds:.2f} s" if self.seconds else ""
        lines.append(
            f"step {1e3 * self.step_time:.3f} ms, lower bound {1e3 * self.lower_bound:.3f} ms (mean){floor}, "
            f"max/mean {self.balance:.3f}, {self.collective_bytes / 1e6:.2f} MB sent per device{timing}"
        )
        return "\n".join(lines)


class _State:
    """Per-device loads while placing, as NumPy columns (memory, lookup, sent, received)."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.table = np.zeros((topo.devices, 4))

    def times(self, table: np.ndarray | None = None) -> np.ndarray:
        t = self.table if table is None else table
        return step_seconds(t[:, 1], t[:, 2], t[:, 3], self.topo)

    def trial(self, extra: _Extra, everyone: DeviceLoad) -> np.ndarray:
        out = self.table + _row(everyone)
        np.add.at(out, extra[0], extra[1])
        return out

    def loads(self) -> list[DeviceLoad]:
        return [DeviceLoad(*row) for row in self.table.tolist()]


_Extra = tuple[np.ndarray, np.ndarray]  # (devices, [shards, 4] loads) added to those devices
_NO_EXTRA: _Extra = (np.zeros(0, np.int64), np.zeros((0, 4)))


def _row(load: DeviceLoad) -> np.ndarray:
    return np.array([load.memory, load.lookup_bytes, load.sent, load.received])


def _strategy_loads(
    table: TableLoad, strategy: Strategy, shards, batch: int, topo: Topology, comm: CommSettings
):
    """(extra per-device loads, load on every device, route, column split) of a
    table placed as `shards` under `strategy`."""
    if strategy is Strategy.DATA_PARALLEL:
        return _NO_EXTRA, data_parallel_load(table, batch, topo), "broadcast", False
    route = _route_of(strategy, shards, table, comm)
    split = any(s.cols != (0, table.dim) for s in shards)
    extra, everyone = _loads_of(table, shards, batch, topo, comm, route, split)
    return extra, everyone, route, split


def _loads_of(table, shards, batch, topo, comm, route, column_split_) -> tuple[_Extra, DeviceLoad]:
    """Per-device extra load of a set of shards: owners' loads, plus what every other
    device carries for each shard (added to all, then taken back from the owner)."""
    everyone = DeviceLoad()
    devices, rows = [], []
    cache: dict[tuple[int, int], tuple[np.ndarray, DeviceLoad]] = {}  # shards of one shape cost alike
    for s in shards:
        shape = (s.rows[1] - s.rows[0], s.cols[1] - s.cols[0])
        if shape not in cache:
            owner, other = shard_loads(table, s.device, *shape, batch, topo, comm, route, column_split_)
            cache[shape] = (_row(owner) - _row(DeviceLoad(sent=other.sent, received=other.received)), other)
        mine, other = cache[shape]
        everyone.add(other)
        devices.append(s.device)
        rows.append(mine)
    return (np.asarray(devices, np.int64), np.asarray(rows).reshape(-1, 4)), everyone


def _candidates(table: TableLoad, topo: Topology, allowed: set[Strategy], state: _State, batch, comm):
    """(strategy, shards) for every placement worth trying."""
    k, per_host, hosts = topo.devices, topo.devices_per_host, topo.hosts
    full_r, full_c = (0, table.rows), (0, table.dim)

    def best_devices(count: int, rows, width: int) -> list[int]:
        """Greedy: each shard to the device whose time grows least (distinct devices)."""
        owner, _ = shard_loads(table, 0, rows[1] - rows[0], width, batch, topo, comm)
        grown = state.times(state.table + _row(owner))
        grown[state.table[:, 0] + owner.memory > topo.memory] = np.inf  # would not fit
        return [int(d) for d in np.argsort(grown, kind="stable")[:count]]

    if Strategy.TABLE_WISE in allowed:
        (d,) = best_devices(1, full_r, table.dim)
        yield Strategy.TABLE_WISE, [_Shard(table.name, Strategy.TABLE_WISE, d, full_r, full_c, True)]
    if Strategy.COLUMN_WISE in allowed:
        for c in sorted(
            {c for c in range(2, min(k, table.dim) + 1) if table.dim % c == 0 and table.dim // c >= 4}
        ):
            width = table.dim // c
            devices = best_devices(c, full_r, width)
            yield (
                Strategy.COLUMN_WISE,
                [
                    _Shard(table.name, Strategy.COLUMN_WISE, d, full_r, (i * width, (i + 1) * width), True)
                    for i, d in enumerate(devices)
                ],
            )
    if Strategy.ROW_WISE in allowed and k > 1:
        yield (
            Strategy.ROW_WISE,
            [
                _Shard(table.name, Strategy.ROW_WISE, d, r, full_c, False)
                for d, r in enumerate(row_blocks(table.rows, k))
                if r[1] > r[0]
            ],
        )
    if Strategy.DATA_PARALLEL in allowed:
        yield (
            Strategy.DATA_PARALLEL,
            [_Shard(table.name, Strategy.DATA_PARALLEL, d, full_r, full_c, False) for d in range(k)],
        )
    if hosts > 1 or per_host > 1:
        for h in range(hosts):
            base = h * per_host
            if Strategy.TABLE_ROW_WISE in allowed and per_host > 1:
                yield (
                    Strategy.TABLE_ROW_WISE,
                    [
                        _Shard(table.name, Strategy.TABLE_ROW_WISE, base + d, r, full_c, False)
                        for d, r in enumerate(row_blocks(table.rows, per_host))
                        if r[1] > r[0]
                    ],
                )
            c = _column_shards(table.dim, per_host)
            if Strategy.TABLE_COLUMN_WISE in allowed and c > 1:
                width = table.dim // c
                yield (
                    Strategy.TABLE_COLUMN_WISE,
                    [
                        _Shard(
                            table.name,
                            Strategy.TABLE_COLUMN_WISE,
                            base + i,
                            full_r,
                            (i * width, (i + 1) * width),
                            False,
                        )
                        for i in range(c)
                    ],
                )
    if Strategy.GRID in allowed and hosts > 1:
        c = _column_shards(table.dim, hosts)
        width = table.dim // c
        yield (
            Strategy.GRID,
            [
                _Shard(table.name, Strategy.GRID, h * per_host + d, r, (h * width, (h + 1) * width), False)
                for h in range(c)
                for d, r in enumerate(row_blocks(table.rows, per_host))
                if r[1] > r[0]
            ],
        )


def _column_shards(dim: int, parts: int) -> int:
    """Most column shards, at most `parts`, that split `dim` evenly into >= 4 columns."""
    return max(c for c in range(1, min(parts, dim) + 1) if dim % c == 0 and (dim // c >= 4 or c == 1))


def _route_of(strategy: Strategy, shards: list[_Shard], table: TableLoad, comm: CommSettings) -> str:
    """The route `mesh.sharded_lookup` picks (auto) for a table's shards: of those that
    apply, the one that sends the fewest bytes per sample (`mesh.cost.ROUTES`; like the
    runtime, the choice leaves the row-wise statistic's exchange out)."""
    if strategy not in (Strategy.ROW_WISE, Strategy.TABLE_ROW_WISE, Strategy.GRID):
        return "broadcast"
    ids = 8 if table.scaled else 4
    f, bag = comm.capacity_factor, table.bag_width
    blocks = len({s.cols for s in shards})  # column blocks: an id goes to one shard of each
    results = sum(2 * table.outputs * (s.cols[1] - s.cols[0]) * 4 for s in shards)  # and gradients
    per_sample = {"broadcast": len(shards) * bag * ids + results}
    if blocks == 1:
        per_sample["rows"] = f * bag * (4 + 2 * table.dim * 4)
    if not table.sequence:
        per_sample["pooled"] = blocks * f * bag * (ids + 4) + results
    return min(per_sample, key=lambda r: (per_sample[r], r != "broadcast"))


def plan_tables(
    tables: Sequence[TableLoad],
    topo: Topology,
    batch: int,
    *,
    comm: CommSettings | None = None,
    strategies: dict[str, Sequence[str]] | None = None,
    refine_seconds: float = 5.0,
    max_moves: int | None = None,
) -> PlanResult:
    """Plans `tables` for `topo` at global batch `batch`.

    Args:
      strategies: optional {table: allowed strategy names}; default every strategy.
      refine_seconds: time budget of the refinement pass.
      max_moves: a cap on refinement moves instead, for plans that must not depend on
        timing (several processes planning the same run must agree).
    Raises:
      PlanningError: a table fits under no allowed strategy; says how much memory is
        missing on which device for its most compact option.
    """
    start = time.perf_counter()
    comm = comm or CommSettings()
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
    alone = {t.name: _alone(t, topo, allowed_of[t.name], batch, comm) for t in tables}
    floor = max(a[0] for a in alone.values())  # no plan beats the costliest table placed alone
    best = None
    for lookahead in LOOKAHEADS:  # a few starts; the fastest (then least total time) wins
        state, placed = _place_all(order, allowed_of, alone, lookahead, batch, topo, comm)
        times = state.times()
        score = (float(times.max()), float(times.sum()))
        if best is None or score < best[0]:
            best = (score, state, placed)
    _, state, placed = best
    _replace_each(state, placed, order, allowed_of, batch, topo, comm)
    deadline = start + refine_seconds if max_moves is None else float("inf")
    _refine(state, placed, {t.name: t for t in tables}, batch, topo, comm, deadline, max_moves)
    times = [float(t) for t in state.times()]
    lower = sum(times) / topo.devices
    mesh = mesh_for_topology(topo)
    plan = ShardingPlan(
        {
            t.name: TablePlan(
                placed[t.name][0], tuple(sorted(Shard(s.device, s.rows, s.cols) for s in placed[t.name][1]))
            )
            for t in tables
        },
        mesh,
    )
    sent = step_bytes(plan, tables, topo.devices, batch, comm)
    return PlanResult(plan, topo, state.loads(), times, lower, time.perf_counter() - start, sent, floor)


def evaluate_plan(
    plan: ShardingPlan,
    tables: Sequence[TableLoad],
    topo: Topology,
    batch: int,
    comm: CommSettings | None = None,
) -> PlanResult:
    """The cost model's estimates for any plan (a hand-written one, a naive baseline)."""
    comm = comm or CommSettings()
    state = _State(topo)
    for table in tables:
        p = plan.tables[table.name]
        shards = [_Shard(table.name, p.strategy, s.device, s.rows, s.cols, False) for s in p.shards]
        extra, everyone, _, _ = _strategy_loads(table, p.strategy, shards, batch, topo, comm)
        state.table = state.trial(extra, everyone)
    times = [float(t) for t in state.times()]
    sent = step_bytes(plan, tables, topo.devices, batch, comm)
    return PlanResult(plan, topo, state.loads(), times, sum(times) / topo.devices, 0.0, sent)


def step_bytes(
    plan: ShardingPlan,
    tables: Sequence[TableLoad],
    devices: int,
    batch: int,
    comm: CommSettings | None = None,
) -> float:
    """Bytes one device sends per step over the embedding collectives of `plan`, counted
    the way the compiled step moves them: a group's `all_to_all` buffers are padded to the
    busiest owner and sent to every device (the per-shard figures above assume no padding),
    each group takes the route the runtime picks (`mesh.sharded_lookup.plan_routes`),
    bucketized routes use their capacity, column shards under row-wise Adagrad add the
    statistic's two exchanges, data-parallel tables gather ids and gradients. The dense
    layers' all-reduce is not included."""
    comm = comm or CommSettings()
    k, b = devices, batch // devices
    share = (k - 1) / k
    groups: dict[tuple, list[TableLoad]] = {}
    for t in tables:
        p = plan.tables[t.name]
        width = p.shards[0].cols[1] - p.shards[0].cols[0]
        groups.setdefault((p.strategy, width, t.element_bytes, t.optimizer), []).append(t)
    total = 0.0
    for (strategy, width, _, optimizer), members in groups.items():
        scaled = any(t.scaled for t in members)
        if strategy is Strategy.DATA_PARALLEL:
            total += sum((k - 1) * b * (t.bag_width * (8 if t.scaled else 4) + t.dim * 4) for t in members)
            continue
        columns, outputs, expected = [0] * k, [0] * k, [0.0] * k
        lanes = 0  # ids per sample the bucketized routes send: one per column block
        for t in members:
            shards = plan.tables[t.name].shards
            lanes += t.bag_width * len({s.cols for s in shards})
            for s in shards:
                columns[s.device] += t.bag_width
                outputs[s.device] += t.outputs
                expected[s.device] += b * t.bag_width * (s.rows[1] - s.rows[0]) / t.rows
        capacity = min(b * lanes, max(1, math.ceil(comm.capacity_factor * max(expected))))
        results = 2 * max(outputs) * width * 4
        sent = {"broadcast": share * k * b * (max(columns) * (8 if scaled else 4) + results)}
        if strategy in (Strategy.ROW_WISE, Strategy.TABLE_ROW_WISE, Strategy.GRID):
            if all(s.cols == (0, t.dim) for t in members for s in plan.tables[t.name].shards):
                sent["rows"] = share * k * capacity * (4 + 2 * width * 4)
            if not any(t.sequence for t in members):
                sent["pooled"] = share * k * (capacity * (12 if scaled else 8) + b * results)
        route = min(sent, key=lambda r: (sent[r], r != "broadcast"))
        total += sent[route]
        column_split = any(s.cols != (0, t.dim) for t in members for s in plan.tables[t.name].shards)
        if column_split and optimizer == "rowwise_adagrad":  # the statistic's two exchanges
            total += 2 * share * k * 4 * (capacity if route == "pooled" else b * max(columns))
    return total


def _alone(table: TableLoad, topo: Topology, allowed, batch: int, comm: CommSettings) -> tuple[float, float]:
    """`table` on an otherwise empty machine: the step time under its best strategy, and
    the least total device time (summed over devices) any strategy costs."""
    empty = _State(topo)
    best, least = float("inf"), float("inf")
    for strategy, shards in _candidates(table, topo, allowed, empty, batch, comm):
        extra, everyone, _, _ = _strategy_loads(table, strategy, shards, batch, topo, comm)
        trial = empty.trial(extra, everyone)
        if not (trial[:, 0] > topo.memory).any():
            times = empty.times(trial)
            best, least = min(best, float(times.max())), min(least, float(times.sum()))
    return (0.0, 0.0) if best == float("inf") else (best, least)


def _place_all(order, allowed_of, alone, lookahead: float, batch, topo: Topology, comm):
    """The greedy pass: each table, in `order`, under the strategy and on the devices that
    give the best score. A score is the step time the placement implies: no sooner than
    the slowest device now, nor than perfect balance of the work placed plus `lookahead`
    times the least the tables still to place will add (a candidate that spreads work over
    every device must leave room for them). Returns (state, {table: placement})."""
    state = _State(topo)
    placed: dict[str, tuple[Strategy, list[_Shard], str, bool]] = {}
    remaining = sum(a[1] for a in alone.values())
    for table in order:
        allowed = allowed_of[table.name]
        remaining -= alone[table.name][1]
        best, shortfall = None, None
        for strategy, shards in _candidates(table, topo, allowed, state, batch, comm):
            extra, everyone, route, split = _strategy_loads(table, strategy, shards, batch, topo, comm)
            trial = state.trial(extra, everyone)
            if (trial[:, 0] > topo.memory).any():
                worst = int(np.argmax(trial[:, 0]))
                missing = trial[worst, 0] - topo.memory
                if shortfall is None or missing < shortfall[0]:
                    shortfall = (missing, worst, strategy)
                continue
            times = state.times(trial)
            total = float(times.sum())
            score = (max(float(times.max()), (total + lookahead * remaining) / topo.devices), total)
            if best is None or score < best[0]:
                best = (score, strategy, shards, trial, route, split)
        if best is None:
            if shortfall is None:
                raise PlanningError(
                    f"table {table.name!r}: none of the allowed strategies {sorted(s.value for s in allowed)} applies"
                )
            missing, device, strategy = shortfall
            raise PlanningError(
                f"table {table.name!r} ({table.rows} x {table.dim}, {table.memory(table.rows, table.dim) / 1e9:.2f} GB "
                f"with optimizer state) does not fit: its most compact option ({strategy.value}) needs "
                f"{missing / 1e9:.2f} GB more on device {device} (capacity {topo.memory / 1e9:.2f} GB per device)"
            )
        _, strategy, shards, trial, route, split = best
        state.table = trial
        placed[table.name] = (strategy, shards, route, split)
    return state, placed


def _replace_each(state: _State, placed, order, allowed_of, batch, topo, comm, passes: int = 2) -> None:
    """Places every table again, largest first, knowing where all the others are (the
    first pass chose before the smaller tables were placed); keeps a new placement only
    when it lowers the step time, or keeps it and lowers the total device time."""
    for _ in range(passes):
        changed = False
        for table in order:
            strategy, shards, _, _ = placed[table.name]
            extra, everyone, _, _ = _strategy_loads(table, strategy, shards, batch, topo, comm)
            mine = state.trial(extra, everyone) - state.table
            current = state.times()
            best = ((float(current.max()), float(current.sum())), None)
            state.table = state.table - mine
            for strategy, shards in _candidates(table, topo, allowed_of[table.name], state, batch, comm):
                extra, everyone, route, split = _strategy_loads(table, strategy, shards, batch, topo, comm)
                trial = state.trial(extra, everyone)
                if (trial[:, 0] > topo.memory).any():
                    continue
                times = state.times(trial)
                score = (float(times.max()), float(times.sum()))
                if score[0] < best[0][0] * (1 - 1e-9) or (
                    score[0] <= best[0][0] and score[1] < best[0][1] * (1 - 1e-9)
                ):
                    best = (score, (strategy, shards, route, split, trial))
            if best[1] is None:
                state.table = state.table + mine
                continue
            strategy, shards, route, split, trial = best[1]
            state.table = trial
            placed[table.name] = (strategy, shards, route, split)
            changed = True
        if not changed:
            return


def _refine(state: _State, placed, tables, batch, topo, comm, deadline: float, max_moves: int | None) -> None:
    """Moves movable shards off the slowest device while each move takes it below the
    slowest time without making the destination that slow."""
    moves = 0
    while time.perf_counter() < deadline and (max_moves is None or moves < max_moves):
        moves += 1
        times = state.times()
        slowest = int(np.argmax(times))
        current = float(times[slowest])
        best = None
        for name, (_, shards, route, split) in placed.items():
            for s in shards:
                if not s.movable or s.device != slowest:
                    continue
                owner, other = shard_loads(
                    tables[name], s.device, s.rows[1] - s.rows[0], s.cols[1] - s.cols[0], batch, topo, comm,
                    route, split,
                )  # fmt: skip
                delta = _row(owner) - _row(DeviceLoad(sent=other.sent, received=other.received))
                trial = state.table.copy()
                trial[slowest] -= delta
                busy = {x.device for x in shards}
                moved = state.times(trial + delta)  # every device as the destination
                rest = state.times(trial)
                fits = trial[:, 0] + delta[0] <= topo.memory
                for d in np.flatnonzero(fits):
                    d = int(d)
                    if d in busy:
                        continue
                    # Both ends of the move end below the slowest time: the step drops, or
                    # at least one device fewer is as slow (ties are common).
                    worst = max(float(moved[d]), float(rest[slowest]))
                    if worst < current * (1 - 1e-9) and (best is None or worst < best[0]):
                        best = (worst, s, d, delta)
        if best is None:
            return
        _, s, d, delta = best
        state.table[s.device] -= delta
        state.table[d] += delta
        s.device = d


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
