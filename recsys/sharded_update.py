"""The sparse update over sharded tables: activation gradients -> updated shard rows.

Mirror of `mesh.sharded.sharded_lookup`, inside `jax.shard_map`: every device gathers
the whole batch's ids and activation gradients of a table's features, deduplicates the
touched rows (the same on every device), sums each row's gradient once, and applies the
table's row optimizer to the rows its own shards hold, in place. A data-parallel table
is updated identically on every device from the whole batch, which is what all-reducing
its gradient would give.

Row-wise Adagrad keeps one statistic per row, the mean of the squared (decayed)
gradient over the whole row. When a row is split into column shards on several
devices, each device sums its columns and a `psum` over the mesh completes the row, so
every shard of a row sees the same statistic as the single-device update.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mesh import collectives
from mesh.sharded import TableLayout, gather_rows, shard_rows
from recsys.lookup import coefficients
from recsys.sparse import JaggedBatch
from recsys.sparse_optim import Slots, row_optimizer
from recsys.specs import EmbeddingConfig, OptimizerKind, Pooling


def init_sharded_slots(
    config: EmbeddingConfig, layouts: Mapping[str, TableLayout], mesh: jax.sharding.Mesh
) -> dict[str, Slots]:
    """{table: {slot: sharded array}}, laid out like the tables."""
    out = {}
    for t in config.tables:
        logical = row_optimizer(t.optimizer).init(t.rows, t.dim)
        out[t.name] = {k: shard_rows(layouts[t.name], v, mesh) for k, v in logical.items()}
    return out


def _unique_rows(config: EmbeddingConfig, table, batch, act_grads, axes):
    """The whole batch's touched rows of `table`, deduplicated, with summed gradients.

    Returns:
      unique: [n] int32 row ids, padded with `rows` (outside every shard).
      grads: [n, dim] float32, the summed gradient of each unique row.
    """
    ids, grads = [], []
    for spec in config.features:
        if spec.table != table.name:
            continue
        feature = batch[spec.name]
        all_ids = collectives.gather_batch(feature.ids, axes)
        valid = collectives.gather_batch(feature.valid_mask(), axes)
        coef = collectives.gather_batch(coefficients(spec, feature), axes)
        g = collectives.gather_batch(act_grads[spec.name].astype(jnp.float32), axes)
        if spec.pooling is not Pooling.NONE:
            g = g[:, None, :]  # every position of a bag gets its bag's gradient
        ids.append(jnp.where(valid, all_ids, table.rows).reshape(-1))
        grads.append((coef[..., None] * g).reshape(-1, table.dim))
    ids, grads = jnp.concatenate(ids), jnp.concatenate(grads)
    order = jnp.argsort(ids, stable=True)
    ordered = ids[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    segment = jnp.cumsum(first) - 1
    unique = jnp.full(ids.shape, table.rows, jnp.int32).at[segment].set(ordered)
    summed = jnp.zeros_like(grads).at[segment].add(grads[order])
    return unique, summed


def sharded_sparse_update(
    config: EmbeddingConfig,
    layouts: Mapping[str, TableLayout],
    mesh: jax.sharding.Mesh,
    tables: Mapping[str, jax.Array],
    slots: Mapping[str, Slots],
    batch: JaggedBatch,
    act_grads: Mapping[str, jax.Array],
    step: jax.Array,
) -> tuple[dict[str, jax.Array], dict[str, Slots]]:
    """Applies every table's optimizer to the rows the batch touched, on their owners.

    Args:
      layouts, tables: from `mesh.sharded.table_layouts` / `shard_tables`.
      slots: from `init_sharded_slots`.
      batch: the batch, sharded over all mesh axes.
      act_grads: {feature: [batch, dim] or [batch, max_ids, dim]}, batch-sharded.
      step: scalar int32, updates applied before this one.
    Returns:
      new (tables, slots), sharded as given.
    """
    axes = tuple(mesh.axis_names)

    def body(tables, slots, batch, act_grads, step):
        new_tables, new_slots = {}, {}
        for t in config.tables:
            lay, opt = layouts[t.name], row_optimizer(t.optimizer)
            wd = t.optimizer.weight_decay
            unique, grads = _unique_rows(config, t, batch, act_grads, axes)
            if lay.data_parallel:
                local = jnp.where(unique < t.rows, unique, t.rows)
                values = tables[t.name].at[local].get(mode="fill", fill_value=0).astype(jnp.float32)
                rows = {k: v.at[local].get(mode="fill", fill_value=0) for k, v in slots[t.name].items()}
                values, rows = opt.update(values, grads, rows, step)
                new_tables[t.name] = (
                    tables[t.name].at[local].set(values.astype(tables[t.name].dtype), mode="drop")
                )
                new_slots[t.name] = {
                    k: slots[t.name][k].at[local].set(v, mode="drop") for k, v in rows.items()
                }
                continue
            d = collectives.device_index(axes)
            row_start, row_count, col_start = lay.slot_metadata(d)
            block = tables[t.name][0]  # [slots, rows_per_slot, width]
            slot_block = {k: v[0] for k, v in slots[t.name].items()}
            parts = []
            for s in range(lay.slots):
                inside = (unique >= row_start[s]) & (unique < row_start[s] + row_count[s])
                local = jnp.where(inside, unique - row_start[s], lay.rows_per_slot)  # outside -> dropped
                values = block[s].at[local].get(mode="fill", fill_value=0).astype(jnp.float32)
                g = jax.lax.dynamic_slice_in_dim(grads, col_start[s], lay.width, axis=1)
                parts.append((inside, local, values, g))
            row_mean_sq = None
            if t.optimizer.kind is OptimizerKind.ROWWISE_ADAGRAD:
                # This device's columns of each row, then the rest of the row from its peers.
                partial = sum(
                    jnp.where(inside, jnp.sum(jnp.square(g + wd * values), axis=1), 0.0)
                    for inside, _, values, g in parts
                )
                row_mean_sq = jax.lax.psum(partial, axes) / t.dim
            for s, (_inside, local, values, g) in enumerate(parts):
                rows = {k: v[s].at[local].get(mode="fill", fill_value=0) for k, v in slot_block.items()}
                values, rows = opt.update(values, g, rows, step, row_mean_sq=row_mean_sq)
                block = block.at[s, local].set(values.astype(block.dtype), mode="drop")
                slot_block = {k: slot_block[k].at[s, local].set(v, mode="drop") for k, v in rows.items()}
            new_tables[t.name] = block[None]
            new_slots[t.name] = {k: v[None] for k, v in slot_block.items()}
        return new_tables, new_slots

    spec_of = {name: (P() if lay.data_parallel else P(axes)) for name, lay in layouts.items()}
    table_specs = {t.name: spec_of[t.name] for t in config.tables}
    slot_specs = {t.name: {k: spec_of[t.name] for k in slots[t.name]} for t in config.tables}
    batch_specs = jax.tree.map(lambda _: P(axes), batch)
    grad_specs = {f: P(axes) for f in act_grads}
    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(table_specs, slot_specs, batch_specs, grad_specs, P()),
        out_specs=(table_specs, slot_specs),
    )
    return mapped(
        {t.name: tables[t.name] for t in config.tables},
        {t.name: slots[t.name] for t in config.tables},
        batch,
        dict(act_grads),
        jnp.asarray(step, jnp.int32),
    )


def logical_slots(config: EmbeddingConfig, layouts, slots) -> dict[str, dict[str, np.ndarray]]:
    """{table: {slot: [rows, ...]}} gathered to the host (tests, small tables)."""
    return {
        t.name: {k: gather_rows(layouts[t.name], v) for k, v in slots[t.name].items()} for t in config.tables
    }
