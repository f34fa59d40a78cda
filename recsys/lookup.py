"""Embedding lookups: the plain per-feature reference and the stacked, vectorized lookup.

`reference_lookup` is the truth every faster path is tested against: one feature at a
time on logical (unstacked) tables, written for clarity. `lookup` is what the train step
runs: one gather per bag position over all features of a lookup group, with pooling fused
into the gathers, so no `[features, batch, max_ids, dim]` intermediate is materialized
(gather-then-sum was several times slower at pooling 20).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu as cpu_kernels
from pallas_kernels.embedding_bag import embedding_bag, embedding_bag_reference
from recsys.kernels import table_path
from recsys.layout import EmbeddingLayout, LookupGroup, build_layout
from recsys.sparse import JaggedBatch, JaggedFeature
from recsys.specs import EmbeddingConfig, FeatureSpec, InitKind, Pooling, TableSpec

# Bag positions gathered in one fused expression; longer bags loop over chunks of this.
_UNROLL_POSITIONS = 32


def init_table(spec: TableSpec, key: jax.Array) -> jax.Array:
    """[rows, dim] initial values of one table in its storage dtype."""
    shape = (spec.rows, spec.dim)
    init = spec.initializer
    if init.kind is InitKind.ZEROS:
        values = jnp.zeros(shape, jnp.float32)
    elif init.kind is InitKind.UNIFORM:
        scale = init.scale if init.scale is not None else 1.0 / np.sqrt(spec.rows)
        values = jax.random.uniform(key, shape, jnp.float32, -scale, scale)
    else:
        scale = init.scale if init.scale is not None else 1.0 / np.sqrt(spec.dim)
        values = scale * jax.random.normal(key, shape, jnp.float32)
    return values.astype(spec.dtype)


def initial_tables(config: EmbeddingConfig, key: jax.Array) -> dict[str, jax.Array]:
    """{table: [rows, dim]} initial values: table i is drawn from `fold_in(key, i)`, so its
    values do not depend on how tables are stacked or sharded."""
    return {t.name: init_table(t, jax.random.fold_in(key, i)) for i, t in enumerate(config.tables)}


def init_tables(config: EmbeddingConfig, key: jax.Array) -> dict[str, jax.Array]:
    """Stacked initial tables, one array per table group: {group: [total_rows, dim]}
    (the values of `initial_tables`)."""
    layout = build_layout(config)

    def make(key):
        logical = initial_tables(config, key)
        out = {}
        for group in layout.table_groups:
            parts = [logical[t.name] for t in group.tables]
            out[group.name] = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        return out

    return jax.jit(make)(key)


def stack_tables(config: EmbeddingConfig, logical: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{table: [rows, dim]} -> {group: [total_rows, dim]}."""
    layout = build_layout(config)
    out = {}
    for group in layout.table_groups:
        parts = []
        for spec in group.tables:
            value = jnp.asarray(logical[spec.name])
            if value.shape != (spec.rows, spec.dim):
                raise ValueError(
                    f"table {spec.name!r}: shape {value.shape}, spec says {(spec.rows, spec.dim)}"
                )
            parts.append(value.astype(group.dtype))
        out[group.name] = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    return out


def unstack_tables(config: EmbeddingConfig, stacked: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{group: [total_rows, dim]} -> {table: [rows, dim]} (the logical, plan-free form)."""
    layout = build_layout(config)
    out = {}
    for group in layout.table_groups:
        for spec, offset in zip(group.tables, group.row_offsets):
            out[spec.name] = stacked[group.name][offset : offset + spec.rows]
    return out


def coefficients(spec: FeatureSpec, feature: JaggedFeature) -> jax.Array:
    """[batch, max_ids] float32 factor of each position: mask x weight (/ length for mean)."""
    coef = feature.valid_mask().astype(jnp.float32)
    if feature.weights is not None:
        coef = coef * feature.weights.astype(jnp.float32)
    if spec.pooling is Pooling.MEAN:
        coef = coef / jnp.maximum(feature.lengths, 1).astype(jnp.float32)[:, None]
    return coef


def reference_lookup(
    config: EmbeddingConfig, tables: dict[str, jax.Array], batch: JaggedBatch
) -> dict[str, jax.Array]:
    """Plain per-feature lookup on logical tables {table: [rows, dim]}.

    Returns {feature: [batch, dim]} for pooled features, [batch, max_ids, dim] for
    sequence features (padding positions are zero), all float32.
    """
    out = {}
    for spec in config.features:
        feature = batch[spec.name]
        rows = tables[spec.table][feature.ids].astype(jnp.float32)  # [batch, max_ids, dim]
        coef = coefficients(spec, feature)
        if spec.pooling is Pooling.NONE:
            out[spec.name] = rows * coef[..., None]
        else:
            out[spec.name] = jnp.sum(rows * coef[..., None], axis=1)
    return out


def group_inputs(layout: EmbeddingLayout, group: LookupGroup, batch: JaggedBatch):
    """Stacked ids (rows of the table group) and coefficients of one lookup group.

    Returns:
      ids: [features, batch, max_ids] int32 row indices into the stacked group array.
      coef: [features, batch, max_ids] float32 (0 on padding).
    """
    ids = jnp.stack([batch[f.name].ids + layout.row_offset(f) for f in group.features])
    coef = jnp.stack([coefficients(f, batch[f.name]) for f in group.features])
    return ids, coef


def pooled_gather(table: jax.Array, ids: jax.Array, coef: jax.Array) -> jax.Array:
    """sum_l coef[..., l] * table[ids[..., l]] -> [features, batch, dim] float32."""

    def positions(start: int | jax.Array, count: int) -> jax.Array:
        total = 0.0
        for offset in range(count):
            l = start + offset
            column = jax.lax.dynamic_index_in_dim(ids, l, axis=2, keepdims=False)
            weight = jax.lax.dynamic_index_in_dim(coef, l, axis=2, keepdims=False)
            rows = table.at[column].get(mode="promise_in_bounds").astype(jnp.float32)
            total = total + rows * weight[..., None]
        return total

    width = ids.shape[2]
    if width <= _UNROLL_POSITIONS:
        return positions(0, width)
    chunks, rest = divmod(width, _UNROLL_POSITIONS)
    acc = jax.lax.fori_loop(
        0,
        chunks,
        lambda c, acc: acc + positions(c * _UNROLL_POSITIONS, _UNROLL_POSITIONS),
        jnp.zeros((*ids.shape[:2], table.shape[1]), jnp.float32),
    )
    return acc + positions(chunks * _UNROLL_POSITIONS, rest) if rest else acc


@functools.partial(jax.tree_util.register_dataclass, data_fields=["groups"], meta_fields=["index"])
@dataclasses.dataclass(frozen=True)
class Activations:
    """Looked-up activations, stored stacked per lookup group.

    `groups[name]` is `[batch, features, dim]` (pooled) or `[batch, features, max_ids,
    dim]` (sequence). Keeping the stacked arrays (rather than one array per feature) lets
    models consume them without slicing and restacking, which XLA:CPU turned into a 4x
    slower lookup, and hands the sparse update its gradients already stacked.
    """

    groups: dict[str, jax.Array]
    index: tuple[tuple[str, str, int], ...]  # (feature, group name, position in group)

    def __getitem__(self, feature: str) -> jax.Array:
        for name, group, position in self.index:
            if name == feature:
                return self.groups[group][:, position]
        raise KeyError(f"no activations for feature {feature!r}")

    def features(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.index)

    @classmethod
    def from_features(cls, config: EmbeddingConfig, per_feature: Mapping[str, jax.Array]) -> Activations:
        """From {feature: [batch, dim] or [batch, max_ids, dim]} (e.g. a sharded lookup's output)."""
        layout = build_layout(config)
        groups = {
            group.name: jnp.stack([per_feature[f.name] for f in group.features], axis=1)
            for group in layout.lookup_groups
        }
        return cls(groups, activation_index(layout))

    def as_dict(self) -> dict[str, jax.Array]:
        return {name: self[name] for name in self.features()}

    def stacked(self, features: Sequence[str]) -> jax.Array:
        """[batch, len(features), ...] in the given order.

        No copy when `features` is exactly one group; otherwise the groups are joined and
        reordered with one gather (per-feature slices restacked were 4x slower on CPU).
        """
        features = tuple(features)
        members = {g: tuple(n for n, group, _ in self.index if group == g) for g in self.groups}
        for group, names in members.items():
            if names == features:
                return self.groups[group]
        known = {n for names in members.values() for n in names}
        unknown = [f for f in features if f not in known]
        if unknown:
            raise KeyError(f"no activations for features {unknown}")
        needed = [g for g, names in members.items() if set(names) & set(features)]
        position = {n: i for i, n in enumerate(n for g in needed for n in members[g])}
        shapes = {self.groups[g].shape[2:] for g in needed}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack features of different shapes {sorted(shapes)}")
        joined = jnp.concatenate([self.groups[g] for g in needed], axis=1)
        return jnp.take(joined, jnp.asarray([position[f] for f in features]), axis=1)


def activation_index(layout: EmbeddingLayout) -> tuple[tuple[str, str, int], ...]:
    return tuple(
        (feature.name, group.name, position)
        for group in layout.lookup_groups
        for position, feature in enumerate(group.features)
    )


def lookup(
    config: EmbeddingConfig, tables: dict[str, jax.Array], batch: JaggedBatch, kernels: str = "auto"
) -> Activations:
    """Stacked lookup of every feature; `lookup(...)[f]` equals `reference_lookup(...)[f]`.

    Args:
      tables: {group: [total_rows, dim]} as made by `init_tables` / `stack_tables`.
      batch: packed ids; they must be in range (the packer guarantees it).
      kernels: "auto", "xla", "cpu" or "pallas" (`recsys.kernels.table_path`). "auto" takes the
        Pallas table-batched embedding bag on GPU and TPU and, on CPU, the CPU kernel
        (`recsys.cpu_kernels`) for pooled features of float32 tables when the library was
        built. On CPU the kernel and XLA forward alone run about as fast; in a train step
        whose update writes the tables in place, XLA copied every gathered row first (3x
        slower).
    """
    layout = build_layout(config)
    groups = {}
    for group in layout.lookup_groups:
        table = tables[group.table_group]
        ids, coef = group_inputs(layout, group, batch)
        path = table_path(table.dtype, table.shape[1], kernels)
        if path == "pallas":
            lengths = jnp.stack([batch[f.name].lengths for f in group.features])
            groups[group.name] = embedding_bag(table, ids, coef, lengths, pooled=not group.sequence)
            continue
        if path == "cpu" and not group.sequence:
            groups[group.name] = cpu_kernels.pooled_lookup(table, ids, coef)  # [batch, features, dim]
            continue
        # Materialize the stacked ids once: fused into each per-position gather, the
        # concatenation was recomputed per element (measured 5x slower at pooling 20).
        ids, coef = jax.lax.optimization_barrier((ids, coef))
        if group.sequence:
            acts = table.at[ids].get(mode="promise_in_bounds").astype(jnp.float32) * coef[..., None]
        else:
            acts = pooled_gather(table, ids, coef)
        groups[group.name] = jnp.moveaxis(acts, 0, 1)  # features-major -> batch-major
    return Activations(groups, activation_index(layout))


def owner_bags(config: EmbeddingConfig, layout, kernels: str = "auto") -> dict:
    """{group: embedding bag} for `mesh.sharded_lookup.sharded_lookup(bags=...)`: the groups
    of a sharded layout (`mesh.sharded.ShardedLayout`) whose owners look up through a
    kernel, by `table_path` on the group's dtype and shard width. "pallas" runs the Pallas
    table-batched embedding bag; "cpu" the CPU kernel for pooled bags (sequence gathers
    stay on XLA). Groups on XLA are left out: the sharded lookup's own gathers serve them."""
    out = {}
    for g in layout.groups:
        path = table_path(config.table(g.tables[0]).dtype, g.width, kernels)
        if path != "xla":
            out[g.name] = functools.partial(_owner_bag, path)
    return out


def _owner_bag(path: str, block: jax.Array, ids: jax.Array, coef: jax.Array, pooled: bool) -> jax.Array:
    """`mesh.routing.BagFn` through `path`."""
    if path == "pallas":
        return embedding_bag(block, ids, coef, pooled=pooled)
    if pooled:
        return cpu_kernels.pooled_lookup(block, ids, coef)
    return embedding_bag_reference(block, ids, coef, pooled=False)
