"""Rows between the host tier and the device tables: what a fill writes where, and what a
read brings back.

A device table group is stored either flat, `[rows, width]` (one device, or a
data-parallel group replicated on every device), or blocked, `[devices, block_rows,
width]` split over the mesh (`mesh.sharded`). A cache block's slots sit in one place per
owner (`Target`): one device, or one per column shard. A fill sends each owner only its
rows and columns; on a mesh the writes and reads run under `shard_map`, each device on
its own block, so nothing is gathered whole.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from recsys.cache.blocks import CacheBlock
from recsys.cache.host import HostTable, Piece


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one cache block's slots sit in one group's storage."""

    group: str
    device: int  # -1: flat storage (one device, or a replicated group)
    offset: int  # storage row of the block's first slot
    cols: tuple[int, int]  # the columns of the table it holds
    key_offset: int  # logical row r rounds as key_offset + r (the uncached storage row)


@dataclasses.dataclass(frozen=True)
class GroupStorage:
    name: str
    blocked: bool  # [devices, block_rows, width] over the mesh; else [rows, width]
    rows: int  # rows per block (blocked) or in all (flat): a padding index, dropped
    width: int
    keyed: bool  # holds rounding keys (narrow tables with cached slots)
    cached: tuple[str, ...]  # its cached tables


@dataclasses.dataclass
class _Lane:
    """What one group's storage on one device receives and gives up."""

    fill_at: list = dataclasses.field(default_factory=list)
    rows: list = dataclasses.field(default_factory=list)
    state: dict = dataclasses.field(default_factory=dict)
    keys: list = dataclasses.field(default_factory=list)
    read_at: list = dataclasses.field(default_factory=list)
    reads: list = dataclasses.field(default_factory=list)  # (table, ids, count, cols)

    def fills(self) -> int:
        return sum(len(a) for a in self.fill_at)

    def read_count(self) -> int:
        return sum(len(a) for a in self.read_at)


class Exchange:
    """Builds the arrays of fills and reads, and runs them on the device tables."""

    def __init__(
        self,
        groups: dict[str, GroupStorage],
        targets: dict[CacheBlock, list[Target]],
        mesh: jax.sharding.Mesh | None,
    ):
        self.groups, self.targets, self.mesh = groups, targets, mesh
        self.devices = 1 if mesh is None else mesh.devices.size

    def build(self, host: dict[str, HostTable], fills, reads, size: int | None = None):
        """(device arrays, {group: [Piece]} of the reads).

        fills: [(block, slots, ids)]: the host rows `ids` (logical) go into `slots` (the
        block's); reads: [(block, slots, ids)]: the rows in `slots`, which hold `ids`, come
        back. Every array is padded to one size, a power of two (`size` at least)."""
        lanes: dict[tuple[str, int], _Lane] = {}
        for block, slots, ids in fills:
            table = host[block.table]
            for t in self.targets[block]:
                lane = lanes.setdefault((t.group, t.device), _Lane())
                cols = slice(*t.cols)
                lane.fill_at.append(slots + t.offset)
                lane.rows.append(table.rows[ids, cols])
                lane.keys.append(ids + t.key_offset)
                for k, v in table.state.items():
                    lane.state.setdefault(k, []).append(v[ids, cols] if v.ndim == 2 else v[ids])
        for block, slots, ids in reads:
            for t in self.targets[block]:
                lane = lanes.setdefault((t.group, t.device), _Lane())
                lane.read_at.append(slots + t.offset)
                lane.reads.append((block.table, ids, len(ids), slice(*t.cols)))
        largest = max([max(lane.fills(), lane.read_count()) for lane in lanes.values()] + [size or 0])
        padded = bucket(largest)
        arrays, pieces = {}, {}
        for name, group in self.groups.items():  # every group, so one program serves each size
            devices = range(self.devices) if group.blocked else [-1]
            mine = [lanes.get((name, d), _Lane()) for d in devices]
            arrays[name] = self._group_arrays(group, mine, padded, host)
            pieces[name] = _pieces(group, mine)
        return self._placed(arrays), pieces

    def _group_arrays(self, group: GroupStorage, lanes: list[_Lane], size: int, host) -> dict:
        """One group's arrays, [devices, size, ...] (blocked) or [size, ...] (flat)."""
        end = group.rows
        template = _template(host, group)
        out = {
            "fill_at": _stack([_padded(lane.fill_at, size, end, np.int32) for lane in lanes], group),
            "read_at": _stack([_padded(lane.read_at, size, end, np.int32) for lane in lanes], group),
            "rows": _stack([_padded(lane.rows, size, 0, template["rows"]) for lane in lanes], group),
            "state": {
                k: _stack([_padded(lane.state.get(k, []), size, 0, like) for lane in lanes], group)
                for k, like in template["state"].items()
            },
        }
        if group.keyed:
            out["keys"] = _stack([_padded(lane.keys, size, 0, np.int32) for lane in lanes], group)
        return out

    def _placed(self, arrays: dict) -> dict:
        """On the devices: blocked groups' arrays split over the mesh, flat ones replicated."""
        if self.mesh is None:
            return jax.device_put(arrays)
        axes = tuple(self.mesh.axis_names)
        split, whole = NamedSharding(self.mesh, P(axes)), NamedSharding(self.mesh, P())
        return {g: jax.device_put(a, split if self.groups[g].blocked else whole) for g, a in arrays.items()}

    # On the device (traced inside the trainer's jitted exchange).

    def read(self, storage: dict, slots: dict, arrays: dict) -> dict:
        """{group: (rows, {slot: values})} at each group's `read_at` (zeros on padding)."""

        def one(block, slot_block, at):
            return _rows_at(block, at), {k: _rows_at(v, at) for k, v in slot_block.items()}

        return {
            g: self._run(self.groups[g], one, storage[g], slots[g], a["read_at"]) for g, a in arrays.items()
        }

    def write(self, storage: dict, slots: dict, keys: dict, arrays: dict):
        """(storage, slots, keys) with the fills written at `fill_at` (padding dropped)."""
        storage, slots, keys = dict(storage), {g: dict(s) for g, s in slots.items()}, dict(keys)

        def one(block, slot_block, key_block, a):
            block = block.at[a["fill_at"]].set(a["rows"], mode="drop")
            slot_block = {
                k: v.at[a["fill_at"]].set(a["state"][k], mode="drop") for k, v in slot_block.items()
            }
            if key_block is not None:
                key_block = key_block.at[a["fill_at"]].set(a["keys"], mode="drop")
            return block, slot_block, key_block

        for g, a in arrays.items():
            storage[g], slots[g], key = self._run(self.groups[g], one, storage[g], slots[g], keys.get(g), a)
            if key is not None:
                keys[g] = key
        return storage, slots, keys

    def _run(self, group: GroupStorage, fn, *args):
        """`fn` on flat storage, or on each device's block of blocked storage."""
        if not group.blocked:
            return fn(*args)
        axes = tuple(self.mesh.axis_names)

        def per_device(*blocks):
            squeezed = jax.tree.map(lambda x: x[0], blocks)
            return jax.tree.map(lambda x: x[None], fn(*squeezed))

        return jax.shard_map(per_device, mesh=self.mesh, in_specs=P(axes), out_specs=P(axes))(*args)


def bucket(n: int) -> int:
    """Exchange sizes are padded to powers of two (at least 16), so few of them compile."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def _rows_at(values: jax.Array, at: jax.Array) -> jax.Array:
    return values.at[at].get(mode="fill", fill_value=0)


def _pieces(group: GroupStorage, lanes: list[_Lane]) -> list[Piece]:
    out = []
    for d, lane in enumerate(lanes):
        start = 0
        for table, ids, count, cols in lane.reads:
            part = slice(start, start + count)
            out.append(Piece(table, ids, (d, part) if group.blocked else part, cols))
            start += count
    return out


def _template(host: dict[str, HostTable], group: GroupStorage) -> dict:
    """Empty arrays with the dtype and trailing shape of a group's rows and state."""
    table = host[group.cached[0]]
    rows = np.zeros((0, group.width), table.rows.dtype)
    state = {k: np.zeros((0, group.width) if v.ndim == 2 else (0,), v.dtype) for k, v in table.state.items()}
    return {"rows": rows, "state": state}


def _padded(parts: list[np.ndarray], size: int, fill, like) -> np.ndarray:
    """`parts` one after another in `size` rows, the rest `fill`; `like`: a dtype, or an
    array giving dtype and trailing shape."""
    dtype, tail = (like, ()) if not isinstance(like, np.ndarray) else (like.dtype, like.shape[1:])
    out = np.full((size, *tail), fill, dtype)
    start = 0
    for part in parts:
        out[start : start + len(part)] = part
        start += len(part)
    return out


def _stack(per_device: list[np.ndarray], group: GroupStorage) -> np.ndarray:
    return np.stack(per_device) if group.blocked else per_device[0]
