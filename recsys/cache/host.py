"""The host tier of a cached table: every row and its optimizer state, in host memory,
and the rows evicted from the device on their way back.

The arrays are NumPy in the process's RAM. On GPU and TPU the fills for the device are
`jax.device_put` from them (staged through pinned buffers by the runtime) and the evicted
rows come back with `copy_to_host_async`; on CPU the host and device buffers are both
RAM but stay separate arrays with the same explicit copies, so this path is the one the
accelerators run.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import numpy as np

from recsys.sparse_optim import Slots


@dataclasses.dataclass
class HostTable:
    """One table's full rows [rows, dim] and optimizer state {slot: [rows, ...]}."""

    rows: np.ndarray
    state: dict[str, np.ndarray]

    def row_bytes(self) -> int:
        """Bytes one row moves with its state."""
        return self.rows[0].nbytes + sum(v[0].nbytes for v in self.state.values())

    def scatter(self, ids: np.ndarray, rows, state: Slots, cols: slice = slice(None)) -> None:
        """Writes rows `ids` (their columns `cols`) and their state."""
        self.rows[ids, cols] = rows
        for k, v in state.items():
            if self.state[k].ndim == 2:
                self.state[k][ids, cols] = v
            else:
                self.state[k][ids] = v


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows of one table inside arrays read from the device: at index `at`, holding the
    table's columns `cols`."""

    table: str
    ids: np.ndarray
    at: tuple | slice
    cols: slice


@dataclasses.dataclass
class _Writeback:
    number: int  # entries are numbered in order of eviction
    pieces: list[Piece]
    rows: jax.Array  # device arrays, being copied to the host
    state: dict[str, jax.Array]


class WritebackQueue:
    """Evicted rows in order of eviction, written into their host tables when they have
    arrived, or at once when a fetch needs one of their ids (an id evicted by one step
    and fetched for a later one must be read after its write-back). Each table keeps,
    per row, the number of the last entry holding it (8 bytes per row, like the slot
    map's arrays), so a fetch finds the entries it waits for in one gather."""

    def __init__(self, tables: dict[str, HostTable]):
        self.tables = tables
        self._queue: collections.deque[_Writeback] = collections.deque()
        self._pushed = 0
        self._last_entry = {t: np.full(len(h.rows), -1, np.int64) for t, h in tables.items()}

    def push(self, pieces: list[Piece], rows: jax.Array, state: dict[str, jax.Array]) -> None:
        if not any(len(p.ids) for p in pieces):
            return
        for array in (rows, *state.values()):
            array.copy_to_host_async()
        for p in pieces:
            self._last_entry[p.table][p.ids] = self._pushed
        self._queue.append(_Writeback(self._pushed, pieces, rows, state))
        self._pushed += 1

    def settle(self, table: str | None = None, ids: np.ndarray | None = None) -> None:
        """Writes back every entry that has arrived, and every entry up to the last one
        holding any of `ids` of `table` (waiting for it)."""
        while self._queue and self._queue[0].rows.is_ready():  # the usual case: all of them
            self._write(self._queue.popleft())
        if ids is None or not len(ids) or not self._queue:
            return
        needed = int(self._last_entry[table][ids].max())
        while self._queue and self._queue[0].number <= needed:
            self._write(self._queue.popleft())

    def drain(self) -> None:
        """Writes back everything (a checkpoint, the end of training)."""
        while self._queue:
            self._write(self._queue.popleft())

    def clear(self) -> None:
        self._queue.clear()

    def _write(self, entry: _Writeback) -> None:
        write(
            self.tables,
            entry.pieces,
            np.asarray(entry.rows),
            {k: np.asarray(v) for k, v in entry.state.items()},
        )


def write(tables: dict[str, HostTable], pieces: list[Piece], rows: np.ndarray, state: dict) -> None:
    """Writes the pieces of arrays read from the device into their host tables."""
    for p in pieces:
        tables[p.table].scatter(p.ids, rows[p.at], {k: v[p.at] for k, v in state.items()}, p.cols)
