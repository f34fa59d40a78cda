"""Which ids of a cached table sit in which device slots, and which slots to reuse.

A `SlotMap` is the host's view of one table's device cache: `slot_of[id]` (-1: not
cached) and `id_in[slot]` (-1: empty). `admit` takes a batch's unique ids, keeps its
hits, and finds slots for its misses: empty ones first, then victims chosen by the
policy. The batch's own hits are never victims, nor are `pinned` slots (a batch
admitted but not yet run), so every row a step reads is in place when it runs.

Policies (the key each ranks victims by, least valuable first):
  lru        the batch that last used the row;
  lfu        how often the id was looked up since training began, then recency;
  lookahead  Belady's rule over the next K batches the input pipeline already holds:
             a row no upcoming batch needs goes first (least often used, then least
             recently), then the row needed furthest in the future.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

from recsys.cache.window import NextUses

# A victim key's fields, low to high: recency, frequency (LFU, lookahead), distance to
# the next use (lookahead). The higher field ranks first.
_RECENCY_BITS, _FREQUENCY_BITS, _TIER_BITS = 40, 13, 10


def _field(bits: int) -> int:
    return (1 << bits) - 1


class CachePolicy(str, enum.Enum):
    LRU = "lru"
    LFU = "lfu"
    LOOKAHEAD = "lookahead"


class CacheOverflow(ValueError):
    """A batch needs more distinct rows of a table than its cache can hold at once."""


@dataclasses.dataclass(frozen=True)
class Admission:
    """What one batch needs from one table's cache."""

    slots: np.ndarray  # [unique] int32 slot of each unique id, in the order given
    fill_slots: np.ndarray  # [misses] int32 slots receiving the misses
    fill_ids: np.ndarray  # [misses] int64 ids fetched into them
    evicted_ids: np.ndarray  # [misses] int64 id each fill slot held before, -1 if empty

    @property
    def hits(self) -> int:
        return len(self.slots) - len(self.fill_ids)


class SlotMap:
    """The id <-> slot map of one cached table of `rows` rows with `capacity` slots."""

    def __init__(self, table: str, rows: int, capacity: int, policy: CachePolicy | str):
        if not 1 <= capacity <= rows:
            raise ValueError(f"table {table!r}: cache capacity {capacity} must be in [1, {rows}]")
        self.table, self.rows, self.capacity = table, rows, capacity
        self.policy = CachePolicy(policy)
        self.slot_of = np.full(rows, -1, np.int32)
        self.id_in = np.full(capacity, -1, np.int64)
        self.last_used = np.zeros(capacity, np.int64)
        self.clock = 0  # batches admitted
        # LFU counts every lookup of an id, cached or not (4 bytes per row).
        self.uses = np.zeros(rows, np.int32) if self.policy is not CachePolicy.LRU else None
        # Lookahead: each slot's next use, slid along with the window (8 bytes per row).
        self.next_uses = NextUses(rows, capacity) if self.policy is CachePolicy.LOOKAHEAD else None

    def admit(self, ids: np.ndarray, *, pinned: np.ndarray | None = None, upcoming=()) -> Admission:
        """Places a batch's unique `ids`; `pinned`: slots that must stay, `upcoming`: the
        unique ids of the batches after it (what `lookahead` sees)."""
        if self.next_uses is not None:
            self.next_uses.slide(ids, upcoming, self.slot_of)
        ids = np.asarray(ids, np.int64)
        self.clock += 1
        slots = self.slot_of[ids]
        missing = np.flatnonzero(slots < 0)
        if self.uses is not None:
            self.uses[ids] += 1
        fill = self._free_slots(len(missing), slots, pinned, upcoming)
        fill_ids = ids[missing]
        evicted = self.id_in[fill]
        self.slot_of[evicted[evicted >= 0]] = -1
        self.slot_of[fill_ids] = fill
        self.id_in[fill] = fill_ids
        slots[missing] = fill
        self.last_used[slots] = self.clock
        if self.next_uses is not None:
            self.next_uses.admitted(slots)
        return Admission(slots.astype(np.int32), fill.astype(np.int32), fill_ids, evicted)

    def _free_slots(self, count: int, hits: np.ndarray, pinned, upcoming) -> np.ndarray:
        """`count` slots for the misses: empty ones, then the policy's victims."""
        if count == 0:
            return np.zeros(0, np.int64)
        blocked = np.zeros(self.capacity, bool)
        blocked[hits[hits >= 0]] = True
        if pinned is not None:
            blocked[pinned] = True
        candidates = np.flatnonzero(~blocked)
        if len(candidates) < count:
            held = int(np.sum(blocked)) - int(np.sum(hits >= 0))  # by the admitted next batch
            by_next = f" and the next batch, admitted already, holds {held} other slots" if held else ""
            raise CacheOverflow(
                f"table {self.table!r}: a batch looks up {int(np.sum(hits >= 0)) + count} distinct rows"
                f"{by_next}, but the cache has {self.capacity} slots; raise the table's cache load "
                "factor or lower the batch size"
            )
        empty = candidates[self.id_in[candidates] < 0]
        if len(empty) >= count:
            return empty[:count]
        occupied = candidates[self.id_in[candidates] >= 0]
        need = count - len(empty)
        key = self._victim_key(occupied, upcoming)
        victims = occupied[np.argpartition(key, need - 1)[:need]] if need < len(occupied) else occupied
        return np.concatenate([empty, victims])

    def _victim_key(self, occupied: np.ndarray, upcoming) -> np.ndarray:
        """Smallest first out, packed in one int64 so that `argpartition` ranks it:
        [distance tier: 10 bits][frequency: 13 bits][recency: 40 bits]."""
        recency = self.last_used[occupied] & _field(_RECENCY_BITS)
        if self.policy is CachePolicy.LRU:
            return recency
        frequency = np.minimum(self.uses[self.id_in[occupied]], _field(_FREQUENCY_BITS)).astype(np.int64)
        key = (frequency << _RECENCY_BITS) | recency
        if self.policy is CachePolicy.LFU:
            return key
        horizon = min(len(upcoming), _field(_TIER_BITS) - 1)  # beyond it: not needed soon
        distance = np.minimum(self.next_uses.slot_next[occupied] - (self.next_uses.front + 1), horizon)
        return ((horizon - distance) << (_FREQUENCY_BITS + _RECENCY_BITS)) | key

    def cached_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, ids) of every occupied slot."""
        slots = np.flatnonzero(self.id_in >= 0)
        return slots, self.id_in[slots]

    def clear(self) -> None:
        self.slot_of[:] = -1
        self.id_in[:] = -1
        self.last_used[:] = 0
        if self.next_uses is not None:
            self.next_uses.clear()
