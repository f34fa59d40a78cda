"""Each cached row's next use within the lookahead window, kept up to date as the window
slides by one batch per admission.

Ranking victims by Belady's rule needs, for every occupied slot, the nearest upcoming
batch that uses its row. Recomputing that from the K batches in view costs K gathers per
admission; here it costs one batch's worth. Batches are numbered as they enter the
window, and every id of every batch in view has a position in one ring of "next batch
using this id" entries. When a batch enters, each of its ids links the entry of its
previous occurrence in the window to the new batch (`last_position` per row finds it).
When the front batch is admitted, its ids' entries are their slots' next uses; a row
the window does not hold again is not needed soon. Rows outside the front batch keep
their next use, unless the entering batch is the first in view to use them.

A window is recognised by the identity of its id arrays: admitting the batch that came
first in the previous window, with the previous window's rest as the next batches (and
at most one batch more), slides it. Any other call (an evaluation batch, a restart)
builds the window anew from the batches given.
"""

from __future__ import annotations

import collections

import numpy as np

NOT_NEEDED = np.iinfo(np.int64).max  # a row no batch in view uses


class NextUses:
    """`slot_next[slot]`: the number of the nearest batch in view using the slot's row
    (`NOT_NEEDED` if none), for the slots of one table's cache of `capacity` slots over
    `rows` rows."""

    def __init__(self, rows: int, capacity: int):
        self.slot_next = np.full(capacity, NOT_NEEDED, np.int64)
        self._last_position = np.full(rows, -1, np.int64)  # ring position of each id's latest occurrence
        self._ring = np.zeros(64, np.int64)  # grows as needed; the next batch using each position's id
        self._window: collections.deque = collections.deque()  # (batch number, ids, first position)
        self._entered = 0  # batches numbered so far
        self._positions = 0  # ring positions handed out so far

    @property
    def front(self) -> int:
        """The number of the batch at the front of the window (the one being admitted)."""
        return self._window[0][0]

    def slide(self, ids: np.ndarray, upcoming, slot_of: np.ndarray) -> None:
        """Makes the window `[ids, *upcoming]`: by one entering batch where it continues
        the previous window, else anew."""
        window = self._window
        held = len(window) - 1
        continues = (
            held >= 0
            and window[0][1] is ids
            and len(upcoming) in (held, held + 1)
            and all(upcoming[j] is window[j + 1][1] for j in range(held))
        )
        if not continues:
            self._restart()
            self._enter(ids, slot_of)
            held = 0
        for batch in upcoming[held:]:
            self._enter(batch, slot_of)

    def admitted(self, slots: np.ndarray) -> None:
        """The front batch's ids now sit in `slots`: their next uses come from the
        window, and the batch leaves it."""
        _, ids, first = self._window.popleft()
        self.slot_next[slots] = self._ring[(first + np.arange(len(ids))) % len(self._ring)]

    def clear(self) -> None:
        self._restart()
        self.slot_next[:] = NOT_NEEDED

    def _restart(self) -> None:
        """Forgets the window: no stored position is in view any more."""
        self._window.clear()
        self.slot_next[:] = NOT_NEEDED

    def _enter(self, ids: np.ndarray, slot_of: np.ndarray) -> None:
        number, first = self._entered, self._positions
        start = self._window[0][2] if self._window else first
        self._reserve(start, first, len(ids))
        self._entered += 1
        self._positions += len(ids)
        previous = self._last_position[ids]
        seen = previous >= start  # an earlier batch in view uses the id: link it here
        self._ring[previous[seen] % len(self._ring)] = number
        self._ring[(first + np.arange(len(ids))) % len(self._ring)] = NOT_NEEDED
        self._last_position[ids] = first + np.arange(len(ids))
        fresh = slot_of[ids[~seen]]  # cached rows this batch is the first in view to use
        self.slot_next[fresh[fresh >= 0]] = number
        self._window.append((number, ids, first))

    def _reserve(self, start: int, end: int, count: int) -> None:
        """Grows the ring so that positions [start, end + count) each have their own
        entry, keeping those in [start, end)."""
        size = len(self._ring)
        while size < end + count - start:
            size *= 2
        if size == len(self._ring):
            return
        grown = np.full(size, NOT_NEEDED, np.int64)
        kept = np.arange(start, end)
        grown[kept % size] = self._ring[kept % len(self._ring)]
        self._ring = grown
