"""Table stacking: which tables share one stacked array, and which features look up together.

Tables with the same dim, dtype and optimizer are stacked into one `[total_rows, dim]`
array (a "table group"), so one gather serves all of them and one scatter updates all of
them; a table's rows start at its row offset inside the group. Features of a group with
the same `max_ids` and pooled/sequence kind form a "lookup group" whose ids are stacked to
`[features, batch, max_ids]` and looked up in one vectorized operation.

Worked example: tables a (10 rows), b (5 rows), both dim 8 with the same optimizer, and
c (7 rows, dim 16) give groups `dim8_0 = [a: rows 0-9, b: rows 10-14]` and
`dim16_1 = [c: rows 0-6]`.
"""

from __future__ import annotations

import dataclasses
import functools

from recsys.specs import EmbeddingConfig, FeatureSpec, Pooling, SparseOptimizerSpec, TableSpec


@dataclasses.dataclass(frozen=True)
class TableGroup:
    name: str
    dim: int
    dtype: str
    optimizer: SparseOptimizerSpec
    tables: tuple[TableSpec, ...]
    row_offsets: tuple[int, ...]  # first row of each table inside the stacked array

    @property
    def total_rows(self) -> int:
        return self.row_offsets[-1] + self.tables[-1].rows

    def offset_of(self, table: str) -> int:
        for spec, offset in zip(self.tables, self.row_offsets):
            if spec.name == table:
                return offset
        raise KeyError(table)


@dataclasses.dataclass(frozen=True)
class LookupGroup:
    table_group: str
    features: tuple[FeatureSpec, ...]
    max_ids: int
    sequence: bool  # pooling NONE: activations keep the bag axis

    @property
    def name(self) -> str:
        kind = "sequence" if self.sequence else "pooled"
        return f"{self.table_group}/{kind}{self.max_ids}"


@dataclasses.dataclass(frozen=True)
class EmbeddingLayout:
    config: EmbeddingConfig
    table_groups: tuple[TableGroup, ...]
    lookup_groups: tuple[LookupGroup, ...]

    def group(self, name: str) -> TableGroup:
        for group in self.table_groups:
            if group.name == name:
                return group
        raise KeyError(name)

    @functools.cached_property
    def group_of_table(self) -> dict[str, TableGroup]:
        return {t.name: g for g in self.table_groups for t in g.tables}

    def row_offset(self, feature: FeatureSpec) -> int:
        return self.group_of_table[feature.table].offset_of(feature.table)


@functools.lru_cache(maxsize=64)
def build_layout(config: EmbeddingConfig) -> EmbeddingLayout:
    """Stacks `config`'s tables into groups; deterministic in the order of the config."""
    keys: dict[tuple, list[TableSpec]] = {}
    for table in config.tables:
        keys.setdefault((table.dim, table.dtype, table.optimizer), []).append(table)
    groups = []
    for index, ((dim, dtype, optimizer), tables) in enumerate(keys.items()):
        offsets, start = [], 0
        for table in tables:
            offsets.append(start)
            start += table.rows
        if start >= 2**31 - 1:
            raise ValueError(
                f"tables {[t.name for t in tables]} stack to {start} rows, past int32 ids; "
                "give them different optimizers or dims to split the group"
            )
        groups.append(TableGroup(f"dim{dim}_{index}", dim, dtype, optimizer, tuple(tables), tuple(offsets)))
    group_of = {t.name: g.name for g in groups for t in g.tables}
    lookup_keys: dict[tuple, list[FeatureSpec]] = {}
    for feature in config.features:
        key = (group_of[feature.table], feature.max_ids, feature.pooling is Pooling.NONE)
        lookup_keys.setdefault(key, []).append(feature)
    lookups = tuple(
        LookupGroup(group, tuple(features), max_ids, sequence)
        for (group, max_ids, sequence), features in lookup_keys.items()
    )
    return EmbeddingLayout(config, tuple(groups), lookups)
