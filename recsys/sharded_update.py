"""The sparse update over sharded tables, on the rows' owners: the optimizer side of the
sharded backward, whose routing `mesh.sharded_update` does.

Each owner takes the positions it served (a row of its block and a weighted gradient
each), deduplicates the rows (one sort), sums each row's gradient once and applies the
group's optimizer to those rows in place (`owner_update`). The dedup, sum and optimizer
run as one fused kernel where one applies (`recsys.kernels.owner_update_path`): Pallas's
`fused_update` on GPU and TPU, the CPU row-wise Adagrad kernel on CPU; otherwise as XLA
ops.

Row-wise Adagrad keeps one statistic per row, the mean of the squared (decayed)
gradient over the whole row. When rows are split into column shards on several devices,
each owner sums its columns per position it served, and the routing's `exchange` adds
up what the shards of each row report, so every shard of a row sees the statistic the
single-device update computes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mesh import sharded_update as mesh_update
from mesh.routing import FeatureRoute
from mesh.sharded import GroupLayout, ShardedLayout
from mesh.sharded_lookup import Routed, StepRoutes
from recsys import kernels as kernel_paths
from recsys.lookup import coefficients
from recsys.sparse import JaggedBatch
from recsys.sparse_optim import Slots, row_optimizer
from recsys.sparse_update import (
    fused_rows_update,
    keyed_rows,
    keyed_update_path,
    round_rows,
    round_slot_rows,
    rounding_seed,
)
from recsys.specs import EmbeddingConfig, OptimizerKind, Pooling

# An optional int32 "slot" of a group: the row each stored row draws its rounding bits
# as (a cached table's slots round as the rows they hold; `recsys.cache`).
ROW_KEY = "row_key"


def feature_routes(config: EmbeddingConfig) -> dict[str, FeatureRoute]:
    return {
        f.name: FeatureRoute(
            table=f.table,
            pooled=f.pooling is not Pooling.NONE,
            ids_per_sample=f.max_ids,
            scaled=f.weighted or f.pooling is Pooling.MEAN,
        )
        for f in config.features
    }


def routing_inputs(config: EmbeddingConfig, batch: JaggedBatch) -> tuple[dict, dict]:
    """({feature: ids, -1 on padding}, {feature: coefficients} of the scaled features)."""
    ids = {f.name: jnp.where(batch[f.name].valid_mask(), batch[f.name].ids, -1) for f in config.features}
    coef = {
        f.name: coefficients(f, batch[f.name])
        for f in config.features
        if f.weighted or f.pooling is Pooling.MEAN
    }
    return ids, coef


def init_sharded_slots(
    config: EmbeddingConfig, layout: ShardedLayout, mesh: jax.sharding.Mesh
) -> dict[str, Slots]:
    """{group: {slot: storage}}, created sharded. Every slot starts as one value for all
    rows, so each device fills its own block (padding rows included, never read)."""
    out = {}
    for g in layout.groups:
        template = row_optimizer(config.table(g.tables[0]).optimizer).init(1, g.width)
        out[g.name] = {k: _fill(v[0], g.shape(v.ndim == 2), g.sharding(mesh)) for k, v in template.items()}
    return out


def _fill(value: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    return jax.jit(lambda: jnp.broadcast_to(value, shape), out_shardings=sharding)()


def sharded_sparse_update(
    config: EmbeddingConfig,
    layout: ShardedLayout,
    mesh: jax.sharding.Mesh,
    storage: Mapping[str, jax.Array],
    slots: Mapping[str, Slots],
    routes: StepRoutes,
    routed: Routed,
    batch: JaggedBatch,
    act_grads: Mapping[str, jax.Array],
    step: jax.Array,
    kernels: str = "auto",
    order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, Slots], jax.Array]:
    """Applies every group's optimizer to the rows the batch touched, on their owners.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      slots: from `init_sharded_slots`.
      routes, routed: the step's routes and what the owners received in the forward pass
        (`mesh.sharded_lookup`).
      batch: the batch, sharded over all mesh axes.
      act_grads: {feature: [batch, dim] or [batch, max_ids, dim]}, batch-sharded.
      step: scalar int32, updates applied before this one.
      kernels: how owners update their rows (`recsys.kernels.owner_update_path`).
      order: the order of the step's collectives so far (`collectives.ordered_shard_map`).
    Returns:
      new (storage, slots), sharded as given, and the order after the update's collectives.
    """
    ids, coef = routing_inputs(config, batch)
    paths = {g.name: owner_update_path(config, layout, g.name, kernels) for g in layout.groups}
    update = functools.partial(owner_update, config, paths)
    # Pallas interprets a kernel (on CPU) by evaluating its body at lowering, where
    # varying blocks meet its invariant grid indices and the varying-axes check fails
    # (jax 0.10); compiled kernels lower to one custom call and keep the check.
    checked = not (jax.default_backend() == "cpu" and "pallas" in paths.values())
    return mesh_update.sharded_update(
        layout,
        mesh,
        storage,
        slots,
        routes,
        routed,
        ids,
        coef,
        act_grads,
        step,
        update,
        order=order,
        check_vma=checked,
    )


def owner_update(
    config: EmbeddingConfig,
    paths: Mapping[str, str],
    g: GroupLayout,
    block,
    slots,
    rows,
    grads,
    exchange,
    *,
    step,
    device,
):
    """`mesh.sharded_update.OwnerUpdate`: deduplicates an owner's positions, sums each row's
    gradient once and applies the group's optimizer in place (through `paths[g.name]`).
    `exchange`, given for column shards, completes row-wise Adagrad's statistic."""
    spec = config.table(g.tables[0]).optimizer
    # Owners' blocks number their rows from 0: seeded by device too. A data-parallel
    # group's copies must stay identical: the same seed everywhere.
    seed = rounding_seed(step, g.name) + (0 if g.data_parallel else device * 7919)
    statistic = None
    if exchange is not None and spec.kind is OptimizerKind.ROWWISE_ADAGRAD:
        statistic = _row_statistic(spec, block, rows.shape, exchange)
    if ROW_KEY not in slots:
        return _owner_update(paths[g.name], spec, step, seed, block, slots, rows, grads, statistic)
    slots = dict(slots)
    keys = slots.pop(ROW_KEY)
    path = keyed_update_path(paths[g.name])
    block, slots = _owner_update(path, spec, step, seed, block, slots, rows, grads, statistic, keys)
    return block, {**slots, ROW_KEY: keys}


def owner_update_path(config: EmbeddingConfig, layout: ShardedLayout, group: str, kernels: str) -> str:
    """How the owners update `group`: `recsys.sparse_update.rows_update_path` on the shard
    width. Row-wise Adagrad over column shards needs the whole row's statistic, which only
    the XLA path takes, so it stays there."""
    g = layout.group(group)
    table = config.table(g.tables[0])
    return kernel_paths.owner_update_path(
        table.dtype, g.width, table.optimizer, g.strategy.column_split, kernels
    )


def _dedup(rows: jax.Array, grads: jax.Array, sentinel: int):
    """Unique rows of a flat list, each row's gradients summed once (deterministic order).

    Returns:
      unique: [n] int32, padded with `sentinel` (outside the block: reads 0, writes drop).
      summed: [n, width] float32.
      segment: [n] the index into `unique` of every input position.
    """
    order = jnp.argsort(rows, stable=True)
    ordered = rows[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    sorted_segment = jnp.cumsum(first) - 1
    unique = jnp.full(rows.shape, sentinel, jnp.int32).at[sorted_segment].set(ordered)
    summed = jnp.zeros_like(grads).at[sorted_segment].add(grads[order])
    segment = jnp.zeros_like(sorted_segment).at[order].set(sorted_segment)
    return unique, summed, segment


def _apply(opt, step, seed, block, slot_block, unique, summed, row_mean_sq=None, keys=None):
    """The optimizer on the unique rows of one block, written back in place (bfloat16 /
    float16 blocks and slots round stochastically; the bits are keyed by the block's rows,
    or by `keys` of them, so they differ from a single-device run's: both are unbiased)."""
    values = block.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)
    slot_rows = {
        k: v.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32) for k, v in slot_block.items()
    }
    values, slot_rows = opt.update(values, summed, slot_rows, step, row_mean_sq=row_mean_sq)
    bits = keyed_rows(unique, keys)
    block = block.at[unique].set(round_rows(values, bits, block.dtype, seed), mode="drop")
    return block, {
        k: slot_block[k].at[unique].set(round_slot_rows(v, bits, slot_block[k].dtype, seed, k), mode="drop")
        for k, v in slot_rows.items()
    }


def _row_statistic(spec, block, shape, exchange):
    """Row-wise Adagrad over column shards: (unique, summed, segment) of `_dedup` -> the
    whole row's mean squared gradient per unique row. `exchange` completes this shard's
    per-position partial sums (shaped `shape`) over the row's other column shards."""

    def statistic(unique, summed, segment):
        partial = _partial_statistic(spec, block, unique, summed, segment).reshape(shape)
        per_position = exchange(partial)
        return jnp.zeros(unique.shape, jnp.float32).at[segment].set(per_position.reshape(-1))

    return statistic


def _partial_statistic(spec, block, unique, summed, segment):
    """Per input position of `_dedup`: the sum over this block's columns of its row's
    squared (decayed) gradient, the part of row-wise Adagrad's statistic a column shard
    holds."""
    values = block.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)
    decayed = summed + spec.weight_decay * values if spec.weight_decay else summed
    return jnp.sum(jnp.square(decayed), axis=1)[segment]


def _owner_update(path, spec, step, seed, block, slot_block, rows, grads, statistic=None, keys=None):
    """Deduplicates an owner's positions (`rows` of its block, `block_rows` for none; their
    gradients), sums each row's gradient once and applies the optimizer in place: through
    the fused kernel of `path` ("pallas", "cpu"), or through XLA, which alone takes the
    whole-row `statistic` of column shards."""
    block_rows = block.shape[0]
    rows = rows.reshape(-1)
    grads = grads.reshape(rows.shape[0], -1)
    if path != "xla" and statistic is None:
        ids = jnp.where(rows < block_rows, rows, -1)
        ones, src = jnp.ones(ids.shape, jnp.float32), jnp.arange(ids.shape[0], dtype=jnp.int32)
        return fused_rows_update(path, spec, block, slot_block, (ids, ones, src, grads), step, seed, keys)
    unique, summed, segment = _dedup(rows, grads, block_rows)
    row_mean_sq = None if statistic is None else statistic(unique, summed, segment)
    return _apply(row_optimizer(spec), step, seed, block, slot_block, unique, summed, row_mean_sq, keys)
