"""Hit rates a cache will reach, estimated from the data's ids before training (what the
planner charges a cached table's misses by, `mesh.cache_plan`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from recsys.cache.blocks import block_capacity
from recsys.cache.simulate import policy_hit_rate
from recsys.cache.slots import CacheOverflow, CachePolicy
from recsys.specs import EmbeddingConfig


class HitRateEstimate:
    """`estimate(table, factor)`: the hit rate `policy` reaches with `factor` of the
    table's rows cached, simulated on the sample batches' ids (each batch's distinct ids
    per table); the first half of the sample warms the cache up and is not counted. None
    for a cache too small for some batch's distinct ids (the run would stop there)."""

    def __init__(self, config: EmbeddingConfig, batches: Iterable, policy: CachePolicy | str, depth: int):
        self.rows = {t.name: t.rows for t in config.tables}
        self.policy, self.depth = CachePolicy(policy), depth
        parts: dict[str, list[np.ndarray]] = {t: [] for t in self.rows}
        for examples in batches:
            ids: dict[str, list] = {t: [] for t in self.rows}
            for f in config.features:
                ids[f.table].append(np.asarray(examples.sparse[f.name].values, np.int64))
            for t, chunks in ids.items():
                parts[t].append(np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64))
        self.traces = parts
        self._known: dict[tuple[str, float], float | None] = {}

    def __call__(self, table: str, factor: float) -> float | None:
        if factor >= 1.0:
            return 1.0
        if (table, factor) not in self._known:
            trace, rows = self.traces[table], self.rows[table]
            try:
                rate = policy_hit_rate(
                    trace, rows, block_capacity(factor, rows), self.policy, self.depth, warmup=len(trace) // 2
                )
            except CacheOverflow:
                rate = None
            self._known[table, factor] = rate
        return self._known[table, factor]
