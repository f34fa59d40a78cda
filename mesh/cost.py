"""The planner's cost model: memory and lookups of every shard, exchanges of every group.

Everything is per training step and per device, in bytes and seconds, and follows what
`mesh.routing`, `mesh.bucketed` and `mesh.sharded_update` do in the compiled step, so
the byte estimates are checked against it (`tests/test_planner.py`). Notation: B global
batch, k devices, b = B / k samples per device, a table of R rows x D columns, a shard of
r rows x c columns, L the feature's bag width (static shapes are padded to it), p its
average ids per sample, e the table's bytes per element, s the optimizer state elements
per table element and t the bytes of a state value (4, or 2 stored as bf16/fp16), W(w)
the bytes on the wire of a w-wide result row plus its gradient row (`RoutingOptions.row_bytes`:
`2 * 4w` uncompressed; each direction's codec, `Codec.wire_width`: 2w for fp16/bf16,
w + 4 for fp8 and w + 8 for int8 with their per-row scale), i the bytes per id (4, or 8
with a per-id coefficient for weighted or mean features), f the bucketized capacity
factor.

Memory of a shard: `r * c * e` for the weights plus the optimizer state: `r * c * s * t`
(Adagrad s = 1, Adam s = 2) or `r * t` (row-wise Adagrad: one value per row).

Lookup time of a shard: the rows it reads, `n = B * p * (r / R)` (a column shard sees
every id of its rows), each `c * e` bytes but at least 32 (one memory transaction), read
once forward and read and written once backward, its state likewise:
`n * max(c e, 32) * (3 + 2 s t / e) / hbm_bandwidth`. A data-parallel table reads the
batch's rows on every device: `B * p * D * 3 * e`.

Communication. Tables with the same strategy, shard width, dtype and optimizer form one
group (`mesh.sharded`), and each group's exchanges are `all_to_all`s of static shapes:
every device sends every peer the same padded buffer, so every device sends and receives
the same bytes (`GroupTraffic`), and a group costs what its busiest owner needs. With
`C` and `O` the most ids and pooled vectors per sample any owner serves, `q = min(b *
lanes, ceil(f * b * E))` the bucketized slots per peer (`E` the most ids per sample an
owner expects when ids spread like rows, `lanes` the ids per sample a device sends: bag
widths times column blocks), and `share = (k - 1) / k`, each device sends per step:
- broadcast route: `share * k * b * (C * i + O * W(w))`: ids out, results back,
  gradients out;
- bucketized rows (whole-row, row-sharded groups): `share * k * q * (4 + W(w))`;
- pooled at the owner (row-sharded groups of pooled features): `share * k * (q * (i + 4)
  + b * O * W(w))`;
  the runtime takes the cheapest route that applies, as the cost model does;
- row-wise Adagrad over column shards adds the statistic's two exchanges, `2 * share * k
  * 4 * (b * C)` (broadcast) or `2 * share * k * 4 * q` (pooled);
- data-parallel tables gather the batch's ids and gradients: `(k - 1) * b * (L * i + D *
  4)` each.

Links: a device's traffic is spread evenly over its peers, so a fraction
`(devices_per_host - 1) / (k - 1)` stays on its host and the rest crosses hosts. Device
time = lookup time + the slower of `intra bytes / intra bandwidth` and `inter bytes /
inter bandwidth`; the step time estimate is the slowest device's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from mesh.routing import RUNTIME_ROUTES, RoutingOptions
from mesh.topology import Topology
from pallas_kernels.fused_update.optimizers import KINDS, OptimizerKind

MIN_ROW_BYTES = 32  # one memory transaction (a GPU sector, half a CPU cache line)
# Optimizer state elements per table element (row-wise Adagrad: one per row instead).
STATE_ELEMENTS = {
    OptimizerKind.SGD: 0.0,
    OptimizerKind.ADAGRAD: 1.0,
    OptimizerKind.ADAM: 2.0,
    OptimizerKind.ROWWISE_ADAGRAD: 0.0,
}


@dataclasses.dataclass(frozen=True)
class TableLoad:
    """What the cost model needs of a table and the feature(s) reading it."""

    name: str
    rows: int
    dim: int
    ids_per_sample: float  # average over the batch (p)
    bag_width: int  # static ids per sample per feature, summed over its features (L)
    element_bytes: int = 4  # e
    state_bytes: int = 4  # bytes per optimizer state value
    optimizer: OptimizerKind = OptimizerKind.ROWWISE_ADAGRAD
    scaled: bool = False  # weighted or mean pooling: coefficients travel with the ids
    outputs: int = 1  # vectors per sample looked up from it: one per pooled feature reading it
    sequence: bool = False  # some feature reading it is unpooled: no pooling at the owner
    # A cached table (`recsys.cache`): the share of its rows each owner's device cache
    # holds, and the share of its lookups expected to hit (from the data's ids).
    cache_factor: float = 1.0
    hit_rate: float = 1.0

    @property
    def id_bytes(self) -> int:
        return 8 if self.scaled else 4

    def __post_init__(self):
        if self.optimizer not in KINDS:
            raise ValueError(
                f"table {self.name!r}: optimizer {self.optimizer!r}; choose from {sorted(KINDS)}"
            )
        object.__setattr__(self, "optimizer", OptimizerKind(self.optimizer))
        if self.rows < 1 or self.dim < 1 or self.bag_width < 1 or self.ids_per_sample < 0:
            raise ValueError(f"table {self.name!r}: rows, dim, bag width must be positive")

    @property
    def cached(self) -> bool:
        return self.cache_factor < 1.0

    def memory(self, rows: int, cols: int, batch: int = 0) -> float:
        """Device bytes of a `rows x cols` shard: weights and optimizer state; cached, its
        slots and the staging buffers of one step's fills and victims (`batch`)."""
        if not self.cached:
            return self.host_memory(rows, cols)
        slots = math.ceil(self.cache_factor * rows)
        return self.host_memory(slots, cols) + 2 * self.host_memory(self.misses(batch, rows), cols)

    def host_memory(self, rows: int, cols: int) -> float:
        """Bytes of `rows x cols` of the table with their optimizer state."""
        if self.optimizer is OptimizerKind.ROWWISE_ADAGRAD:
            return rows * cols * self.element_bytes + rows * self.state_bytes
        return rows * cols * (self.element_bytes + self.state_bytes * STATE_ELEMENTS[self.optimizer])

    def misses(self, batch: int, rows: int) -> float:
        """Rows a shard of `rows` rows fetches per step (at most its rows)."""
        return min(rows, batch * self.ids_per_sample * (1.0 - self.hit_rate) * rows / self.rows)

    def host_bytes(self, batch: int, rows: int, cols: int) -> float:
        """Bytes a cached shard moves per step over its host link: each miss comes in and
        a victim goes back, each a row with its optimizer state."""
        return 2 * self.host_memory(1, cols) * self.misses(batch, rows) if self.cached else 0.0

    def lookup_bytes(self, batch: int, rows: int, cols: int) -> float:
        """Bytes of memory traffic for a shard's lookups and updates in one step."""
        looked_up = batch * self.ids_per_sample * rows / self.rows
        state = STATE_ELEMENTS[self.optimizer]
        # A row read moves at least one memory transaction, however narrow the shard.
        row_bytes = max(cols * self.element_bytes, MIN_ROW_BYTES)
        return looked_up * row_bytes * (3 + 2 * self.state_bytes * state / self.element_bytes)


@dataclasses.dataclass
class DeviceLoad:
    """What one device holds and does per step."""

    memory: float = 0.0
    lookup_bytes: float = 0.0
    sent: float = 0.0  # bytes per step, all links
    received: float = 0.0
    host_bytes: float = 0.0  # cached tables' misses and write-backs per step


def device_time(load: DeviceLoad, topo: Topology) -> float:
    """Seconds one device spends per step: lookups, then the slower link level."""
    return float(step_seconds(load.lookup_bytes, load.sent, load.received, topo, load.host_bytes))


def step_seconds(lookup_bytes, sent, received, topo: Topology, host_bytes=0.0):
    """`device_time` on NumPy arrays (or floats) of per-device figures. A cached table's
    host traffic is charged in full: the pipeline overlaps it with the step on an
    accelerator, but a step that waits for its misses waits for all of them."""
    k, per_host = topo.devices, topo.devices_per_host
    traffic = np.maximum(sent, received)
    intra_share = (per_host - 1) / (k - 1) if k > 1 else 0.0
    intra = traffic * intra_share / topo.intra_bandwidth
    inter = traffic * (1 - intra_share) / topo.inter_bandwidth if topo.hosts > 1 else 0.0 * traffic
    return lookup_bytes / topo.hbm_bandwidth + host_bytes / topo.host_bandwidth + np.maximum(intra, inter)


def activation_bytes(tables: Sequence[TableLoad], batch: int, devices: int) -> float:
    """Device memory per device of the batch's embedding activations and their gradients
    (float32; the dense layers' own activations are the model's and not counted)."""
    per_sample = sum(t.outputs * t.dim for t in tables)
    return 2 * 4 * per_sample * batch / devices


def data_parallel_lookup_bytes(table: TableLoad, batch: int) -> float:
    """Every device's memory traffic for a replicated table (see the module docstring)."""
    return batch * table.ids_per_sample * table.dim * 3 * table.element_bytes


@dataclasses.dataclass
class GroupTraffic:
    """What the exchanges of one group depend on, accumulated as its tables are placed.

    Counts rather than flags, so a table can be taken out again (`add` with sign -1)."""

    devices: int
    width: int  # columns per shard (data-parallel: the dim)
    row_sharded: bool  # row_wise, table_row_wise, grid: bucketized routes apply
    data_parallel: bool
    rowwise_adagrad: bool
    columns: np.ndarray = None  # per owner: ids per sample it receives on the broadcast route
    outputs: np.ndarray = None  # per owner: pooled vectors per sample it returns
    expected: np.ndarray = None  # per owner: ids per sample it expects from one source
    lanes: float = 0.0  # ids per sample a device sends on a bucketized route
    scaled: int = 0  # tables whose ids travel with a coefficient
    sequence: int = 0  # tables read by an unpooled feature (no pooling at the owner)
    split: int = 0  # tables in several column blocks
    partial_rows: int = 0  # same, the "rows" route needs whole rows
    gathered: float = 0.0  # data-parallel: bytes per sample gathered from each peer
    tables: int = 0

    def __post_init__(self):
        for name in ("columns", "outputs", "expected"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.devices))

    def copy(self) -> GroupTraffic:
        return dataclasses.replace(
            self, columns=self.columns.copy(), outputs=self.outputs.copy(), expected=self.expected.copy()
        )

    def add(self, table: TableLoad, shards, sign: int = 1) -> None:
        """Adds (sign -1: removes) `table` placed as `shards`: (device, rows, cols) each."""
        self.add_table(table, shards, sign)
        self.add_owners(table, shards, sign)

    def add_table(self, table: TableLoad, shards, sign: int = 1) -> None:
        """The parts of `add` that do not depend on which devices own the shards."""
        self.tables += sign
        self.scaled += sign * table.scaled
        self.sequence += sign * table.sequence
        if self.data_parallel:
            self.gathered += sign * (table.bag_width * table.id_bytes + table.dim * 4)
            return
        blocks = len({cols for _, _, cols in shards})
        self.split += sign * (blocks > 1)
        self.partial_rows += sign * any(cols != (0, table.dim) for _, _, cols in shards)
        self.lanes += sign * table.bag_width * blocks

    def add_owners(self, table: TableLoad, shards, sign: int = 1) -> None:
        """The parts of `add` that do: what each owner serves."""
        if self.data_parallel:
            return
        devices = np.array([device for device, _, _ in shards], np.int64)
        np.add.at(self.columns, devices, sign * table.bag_width)
        np.add.at(self.outputs, devices, sign * table.outputs)
        np.add.at(self.expected, devices, [sign * self.share(table, rows) for _, rows, _ in shards])

    @staticmethod
    def share(table: TableLoad, rows) -> float:
        """Ids per sample a shard of these rows expects from each source."""
        return table.bag_width * (rows[1] - rows[0]) / table.rows

    def bytes(self, batch: int, routing: RoutingOptions) -> tuple[float, str]:
        """(bytes each device sends per step, and receives as many; the route taken)."""
        total, route = self.bytes_if(
            batch, routing, self.columns.max(), self.outputs.max(), self.expected.max()
        )
        return float(total), RUNTIME_ROUTES[int(route)]

    def bytes_with_shard_on_each(
        self, table: TableLoad, rows, batch: int, routing: RoutingOptions
    ) -> np.ndarray:
        """[devices] `bytes` if one more shard of `table` (these rows; its other shards
        already counted by `add_table`) went to each device in turn."""
        columns = np.maximum(self.columns.max(), self.columns + table.bag_width)
        outputs = np.maximum(self.outputs.max(), self.outputs + table.outputs)
        expected = np.maximum(self.expected.max(), self.expected + self.share(table, rows))
        return self.bytes_if(batch, routing, columns, outputs, expected)[0]

    def bytes_if(self, batch: int, routing: RoutingOptions, columns, outputs, expected):
        """`bytes` given the busiest owner's figures, as NumPy arrays of trials (one per
        entry): (bytes, index into RUNTIME_ROUTES of the route taken)."""
        columns, outputs, expected = np.broadcast_arrays(*map(np.asarray, (columns, outputs, expected)))
        k = self.devices
        if self.tables == 0 or k == 1:
            return np.zeros(columns.shape), np.zeros(columns.shape, int)
        b, share = batch / k, (k - 1) / k
        if self.data_parallel:
            return np.full(columns.shape, (k - 1) * b * self.gathered), np.zeros(columns.shape, int)
        ids = 8 if self.scaled else 4
        results = routing.row_bytes(self.width)
        q = np.maximum(1, np.minimum(b * self.lanes, np.ceil(routing.capacity_factor * b * expected)))
        never = np.full(columns.shape, np.inf)
        sent = np.stack(
            [
                share * k * b * (columns * ids + outputs * results),
                share * k * q * (4 + results) if self.row_sharded and not self.partial_rows else never,
                share * k * (q * (ids + 4) + b * outputs * results)
                if self.row_sharded and not self.sequence
                else never,
            ]
        )
        route = np.argmin(sent, axis=0)  # the runtime picks by the exchanges alone; ties: broadcast
        total = np.take_along_axis(sent, route[None], axis=0)[0]
        if self.split and self.rowwise_adagrad:
            total = total + 2 * share * k * 4 * np.where(route == 2, q, b * columns)
        return total, route
