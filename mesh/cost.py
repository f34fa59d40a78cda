"""The planner's cost model: memory, lookup time and communication of every shard.

Everything is per training step and per device, in bytes and seconds, and follows what
`mesh.routing`, `mesh.bucketed` and `recsys.sharded_update` actually do, so the byte
estimates can be checked against the compiled step (`tests/test_planner.py`). Notation:
B global batch, k devices, b = B / k samples per device, a table of R rows x D columns, a
shard of r rows x c columns, L the feature's bag width (static shapes are padded to it),
p its average ids per sample, e the table's bytes per element, s the optimizer state
elements per table element, w the bytes per element of a communicated value (4 for
fp32; 2 when compressed to fp16/bf16).

Memory of a shard: `r * c * e` for the weights plus the optimizer state: `r * c * s * 4`
(Adagrad s = 1, Adam s = 2) or `r * 4` (row-wise Adagrad: one float per row).

Lookup time of a shard: the rows it reads, `n = B * p * (r / R)` (a column shard sees
every id of its rows), each `c * e` bytes but at least 32 (one memory transaction), read
once forward and read and written once backward, its state likewise:
`n * max(c e, 32) * (3 + 8 s / e) / hbm_bandwidth`.

Communication, broadcast route (`mesh.routing`), per shard on its owner o:
- ids out: every device sends o its samples' ids: `b * L * 4` from each other device
  (`b * L * 8` with per-id coefficients, for weighted or mean features);
- results back: o sends every other device its pooled `b * c * w` (times the number of
  pooled features reading the table);
- gradients out: every other device sends o `b * c * w` (likewise).
So o sends `(k - 1) * b * c * w` and receives `(k - 1) * b * (L * 4 + c * w)`; every
other device sends `b * (L * 4 + c * w)` and receives `b * c * w`.

Bucketized routes (`mesh.bucketed`, whole-row shards): each device sends a row shard's
owner `q = f * b * L * r / R` slots (f the capacity factor). Route "rows": each slot
carries a row index (4 bytes); `q` rows of `c * w` come back and `q` gradients of `c * w`
go out. Route "pooled": each slot carries the row and its position in the sender's
batch (8 bytes, 12 with a coefficient); the owner pools, so results and gradients travel
as in the broadcast route, `b * c * w` per pooled feature each way.

Data-parallel table: every device holds it; it gathers the batch's ids and gradients:
`(k - 1) * b * (L * 4 + D * 4)` sent and received, and updates `B * p` rows.

Row-wise Adagrad over column shards completes each row's statistic through the senders:
every position's partial goes back to its sender and the row's sum returns, one float
each way per id received: on the broadcast route `b * L * 4` each way per peer (like the
ids), on the pooled route `q * 4`.

Links: a device's traffic to its peers is spread evenly over them (the batch is), so
a fraction `(devices_per_host - 1) / (k - 1)` stays on its host and the rest crosses
hosts. Device time = lookup time + the slower of `intra bytes / intra bandwidth` and
`inter bytes / inter bandwidth`, bytes being the larger of sent and received. The step
time estimate is the slowest device's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from mesh.topology import Topology

ROUTES = ("broadcast", "rows", "pooled")  # see the module docstring
MIN_ROW_BYTES = 32  # one memory transaction (a GPU sector, half a CPU cache line)
STATE_ELEMENTS = {"sgd": 0.0, "adagrad": 1.0, "adam": 2.0, "rowwise_adagrad": 0.0}


@dataclasses.dataclass(frozen=True)
class TableLoad:
    """What the cost model needs of a table and the feature(s) reading it."""

    name: str
    rows: int
    dim: int
    ids_per_sample: float  # average over the batch (p)
    bag_width: int  # static ids per sample per feature, summed over its features (L)
    element_bytes: int = 4  # e
    optimizer: str = "rowwise_adagrad"
    scaled: bool = False  # weighted or mean pooling: coefficients travel with the ids
    outputs: int = 1  # vectors per sample looked up from it: one per pooled feature reading it
    sequence: bool = False  # some feature reading it is unpooled: no pooling at the owner

    def __post_init__(self):
        if self.optimizer not in STATE_ELEMENTS:
            raise ValueError(
                f"table {self.name!r}: optimizer {self.optimizer!r}; choose from {sorted(STATE_ELEMENTS)}"
            )
        if self.rows < 1 or self.dim < 1 or self.bag_width < 1 or self.ids_per_sample < 0:
            raise ValueError(f"table {self.name!r}: rows, dim, bag width must be positive")

    def memory(self, rows: int, cols: int) -> float:
        """Bytes of a `rows x cols` shard: weights and optimizer state."""
        if self.optimizer == "rowwise_adagrad":
            return rows * cols * self.element_bytes + rows * 4
        return rows * cols * (self.element_bytes + 4 * STATE_ELEMENTS[self.optimizer])

    def lookup_bytes(self, batch: int, rows: int, cols: int) -> float:
        """Bytes of memory traffic for a shard's lookups and updates in one step."""
        looked_up = batch * self.ids_per_sample * rows / self.rows
        state = 0.0 if self.optimizer == "rowwise_adagrad" else STATE_ELEMENTS[self.optimizer]
        # A row read moves at least one memory transaction, however narrow the shard.
        row_bytes = max(cols * self.element_bytes, MIN_ROW_BYTES)
        return looked_up * row_bytes * (3 + 8 * state / self.element_bytes)


@dataclasses.dataclass
class DeviceLoad:
    """What one device holds and does per step: accumulated over the shards placed."""

    memory: float = 0.0
    lookup_bytes: float = 0.0
    sent: float = 0.0  # bytes per step, all links
    received: float = 0.0

    def add(self, other: DeviceLoad) -> None:
        self.memory += other.memory
        self.lookup_bytes += other.lookup_bytes
        self.sent += other.sent
        self.received += other.received


@dataclasses.dataclass(frozen=True)
class CommSettings:
    """Bytes per communicated value, forward and backward (compressed collectives)."""

    forward_bytes: int = 4
    backward_bytes: int = 4
    capacity_factor: float = 2.0


def device_time(load: DeviceLoad, topo: Topology) -> float:
    """Seconds one device spends per step: lookups, then the slower link level."""
    return float(step_seconds(load.lookup_bytes, load.sent, load.received, topo))


def step_seconds(lookup_bytes, sent, received, topo: Topology):
    """`device_time` on NumPy arrays (or floats) of per-device figures."""
    k, per_host = topo.devices, topo.devices_per_host
    traffic = np.maximum(sent, received)
    intra_share = (per_host - 1) / (k - 1) if k > 1 else 0.0
    intra = traffic * intra_share / topo.intra_bandwidth
    inter = traffic * (1 - intra_share) / topo.inter_bandwidth if topo.hosts > 1 else 0.0 * traffic
    return lookup_bytes / topo.hbm_bandwidth + np.maximum(intra, inter)


def shard_loads(
    table: TableLoad,
    owner: int,
    rows: int,
    cols: int,
    batch: int,
    topo: Topology,
    comm: CommSettings,
    route: str = "broadcast",
    column_split: bool = False,
) -> tuple[DeviceLoad, DeviceLoad]:
    """(load on the owner, load on every other device) of one shard, per the formulas above."""
    k = topo.devices
    b = batch / k
    ids = 8 if table.scaled else 4
    owner_load = DeviceLoad(
        memory=table.memory(rows, cols), lookup_bytes=table.lookup_bytes(batch, rows, cols)
    )
    other = DeviceLoad()
    if k == 1:
        return owner_load, other
    if route not in ROUTES:
        raise ValueError(f"route {route!r}; choose from {ROUTES}")
    fwd, bwd = comm.forward_bytes, comm.backward_bytes
    q = comm.capacity_factor * b * table.bag_width * rows / table.rows
    if route == "rows":
        owner_load.sent += (k - 1) * q * cols * fwd
        owner_load.received += (k - 1) * q * (4 + cols * bwd)
        other.sent += q * (4 + cols * bwd)
        other.received += q * cols * fwd
    else:
        vectors = table.outputs * cols
        sent_ids = b * table.bag_width * ids if route == "broadcast" else q * (ids + 4)
        owner_load.sent += (k - 1) * b * vectors * fwd
        owner_load.received += (k - 1) * (sent_ids + b * vectors * bwd)
        other.sent += sent_ids + b * vectors * bwd
        other.received += b * vectors * fwd
    if column_split and table.optimizer == "rowwise_adagrad":
        if route == "pooled":  # one float per slot to the sender and the row's sum back
            owner_load.sent += (k - 1) * q * 4
            owner_load.received += (k - 1) * q * 4
            other.sent += q * 4
            other.received += q * 4
        else:
            owner_load.sent += (k - 1) * b * table.bag_width * 4
            owner_load.received += (k - 1) * b * table.bag_width * 4
            other.sent += b * table.bag_width * 4
            other.received += b * table.bag_width * 4
    return owner_load, other


def data_parallel_load(table: TableLoad, batch: int, topo: Topology) -> DeviceLoad:
    """Every device's load for a replicated table (see the module docstring)."""
    k = topo.devices
    exchanged = (k - 1) * (batch / k) * (table.bag_width * 4 + table.dim * 4) if k > 1 else 0.0
    return DeviceLoad(
        memory=table.memory(table.rows, table.dim),
        lookup_bytes=batch * table.ids_per_sample * table.dim * 3 * table.element_bytes,
        sent=exchanged,
        received=exchanged,
    )


def total(loads: Iterable[DeviceLoad]) -> DeviceLoad:
    out = DeviceLoad()
    for load in loads:
        out.add(load)
    return out
