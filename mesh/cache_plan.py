"""Plans for tables that do not fit the devices: some tables cached over host memory.

`plan_with_cache` plans the tables as they are; where they do not fit, it caches tables
step by step (`CACHE_FACTORS`: the share of a table's rows its device caches hold) and
plans again. Each step takes the table whose next smaller cache frees the most device
memory per second of host-link traffic it adds, the traffic following the hit rate the
caller estimates for that cache size (from the data's ids, `recsys.cache.estimate`, or a
Zipf law, `zipf_hit_rate`). The cost model charges a cached table its slots and staging
buffers in device memory and its misses and write-backs at the host link's bandwidth
(`mesh.cost.TableLoad`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from mesh.cost import TableLoad
from mesh.plan import Strategy
from mesh.planner import PlanningError, PlanResult, plan_tables
from mesh.topology import Topology

CACHE_FACTORS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
WHOLE_ROW_STRATEGIES = tuple(s.value for s in Strategy if not s.row_sharded)
# Tables are cached until they take at most this share of the devices' free memory
# before the planner runs: placement needs some slack (shards are not divisible).
_PACKING = 0.9

# (table, cache factor) -> expected hit rate; None where a cache that small cannot hold a batch.
HitRate = Callable[[str, float], float | None]


def plan_with_cache(
    tables: Sequence[TableLoad],
    topo: Topology,
    batch: int,
    hit_rate: HitRate,
    *,
    reserved_bytes: float = 0.0,
    strategies: dict[str, Sequence[str]] | None = None,
    **options,
) -> PlanResult:
    """`plan_tables`, caching tables where they do not fit. Raises PlanningError when even
    the smallest caches do not fit, naming what is missing.

    A cached table keeps its rows whole on its owners (`WHOLE_ROW_STRATEGIES`): each row
    block of a row-sharded table has its own cache of equal size, and skewed ids would
    crowd the hottest block's while the hit rates estimated for the whole table promise
    otherwise."""
    level = {t.name: 0 for t in tables}
    current = {t.name: t for t in tables}
    free = topo.devices * (topo.memory - reserved_bytes)
    while sum(t.memory(t.rows, t.dim, batch) for t in current.values()) > _PACKING * free:
        if not _cache_more(current, level, batch, topo, hit_rate):
            break
    while True:
        allowed = dict(strategies or {})
        for name, table in current.items():
            if table.cached:
                given = allowed.get(name, [s.value for s in Strategy])
                allowed[name] = [s for s in given if s in WHOLE_ROW_STRATEGIES] or list(WHOLE_ROW_STRATEGIES)
        try:
            return plan_tables(
                list(current.values()),
                topo,
                batch,
                reserved_bytes=reserved_bytes,
                strategies=allowed,
                **options,
            )
        except PlanningError as e:
            if not _cache_more(current, level, batch, topo, hit_rate):
                raise PlanningError(
                    f"{e}; with every table cached at {CACHE_FACTORS[-1]:.0%} of its rows it still does not fit"
                ) from None


def _cache_more(current: dict, level: dict, batch: int, topo: Topology, hit_rate: HitRate) -> bool:
    """Moves the table that frees most memory per added host-link second to its next
    smaller cache; False when every table is at the smallest."""
    best = None
    for name, table in current.items():
        if level[name] + 1 >= len(CACHE_FACTORS):
            continue
        factor = CACHE_FACTORS[level[name] + 1]
        rate = hit_rate(name, factor)
        if rate is None:
            continue
        smaller = dataclasses.replace(table, cache_factor=factor, hit_rate=rate)
        freed = table.memory(table.rows, table.dim, batch) - smaller.memory(smaller.rows, smaller.dim, batch)
        added = (
            smaller.host_bytes(batch, smaller.rows, smaller.dim)
            - table.host_bytes(batch, table.rows, table.dim)
        ) / topo.host_bandwidth
        value = freed / max(added, 1e-12)
        if freed > 0 and (best is None or value > best[0]):
            best = (value, name, smaller)
    if best is None:
        return False
    _, name, smaller = best
    current[name] = smaller
    level[name] += 1
    return True


def zipf_hit_rate(rows: int, factor: float, exponent: float) -> float:
    """The share of lookups of ids drawn from a Zipf law over `rows` ids that land on
    the `factor x rows` most frequent ones: a frequency-aware cache's steady state."""
    if factor >= 1.0:
        return 1.0
    cached = max(1, math.ceil(factor * rows))
    return _harmonic(cached, exponent) / _harmonic(rows, exponent)


def _harmonic(n: int, s: float) -> float:
    """sum_{k=1..n} k^-s: the first terms exactly, the rest by the Euler-Maclaurin integral."""
    exact = min(n, 1000)
    total = sum(k**-s for k in range(1, exact + 1))
    if n > exact:
        a, b = exact + 0.5, n + 0.5
        total += math.log(b / a) if abs(s - 1.0) < 1e-12 else (b ** (1 - s) - a ** (1 - s)) / (1 - s)
    return total
