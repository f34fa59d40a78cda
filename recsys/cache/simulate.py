"""Hit rates of a cache policy on an id trace, beside Belady's offline optimum.

A trace is a list of batches' unique ids for one table. A hit is a unique id of a batch
that was already cached when the batch was admitted (a batch's repeats of an id count
once: the step reads the row from its slot either way).
"""

from __future__ import annotations

import numpy as np

from recsys.cache.slots import CachePolicy, SlotMap


def policy_hit_rate(
    trace: list[np.ndarray], rows: int, capacity: int, policy: CachePolicy | str, depth: int, warmup: int = 0
) -> float:
    """The hit rate of `policy` as a cached trainer runs it, `lookahead` seeing the next
    `depth` batches; the first `warmup` batches fill the cache and are not counted."""
    slots = SlotMap("trace", rows, capacity, policy)
    hits = lookups = 0
    for i, ids in enumerate(trace):
        admitted = slots.admit(ids, upcoming=trace[i + 1 : i + 1 + depth])
        if i >= warmup:
            hits += admitted.hits
            lookups += len(ids)
    return hits / max(lookups, 1)


def belady_hit_rate(trace: list[np.ndarray], rows: int, capacity: int) -> float:
    """Belady's optimum: on a miss, evict the cached id whose next use is furthest away
    (the whole future known; nothing pinned but the batch's own ids)."""
    next_use = _next_uses(trace, rows)
    never = len(trace)
    slot_of = np.full(rows, -1, np.int64)
    id_in = np.full(capacity, -1, np.int64)
    slot_next = np.full(capacity, never, np.int64)  # empty slots: never needed
    hits = lookups = 0
    for ids, following in zip(trace, next_use):
        slots = slot_of[ids]
        missing = slots < 0
        hits += int(np.sum(~missing))
        lookups += len(ids)
        if missing.any():
            free = np.ones(capacity, bool)
            free[slots[~missing]] = False
            candidates = np.flatnonzero(free)
            need = int(missing.sum())
            if need > len(candidates):
                raise ValueError(f"a batch has {len(ids)} unique ids, more than the {capacity} slots")
            # Empty slots rank as never needed; otherwise furthest next use first.
            rank = np.where(id_in[candidates] < 0, never + 1, slot_next[candidates])
            chosen = (
                candidates[np.argpartition(-rank, need - 1)[:need]] if need < len(candidates) else candidates
            )
            old = id_in[chosen]
            slot_of[old[old >= 0]] = -1
            slot_of[ids[missing]] = chosen
            id_in[chosen] = ids[missing]
            slots[missing] = chosen
        slot_next[slots] = following
    return hits / max(lookups, 1)


def _next_uses(trace: list[np.ndarray], rows: int) -> list[np.ndarray]:
    """For each batch and each of its ids, the index of the next batch using the id
    (len(trace) if none)."""
    last = np.full(rows, len(trace), np.int64)
    out = [None] * len(trace)
    for i in range(len(trace) - 1, -1, -1):
        out[i] = last[trace[i]]
        last[trace[i]] = i
    return out
