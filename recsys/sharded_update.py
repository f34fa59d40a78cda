"""The sparse update over sharded tables: activation gradients -> updated rows, on their owners.

Inside `jax.shard_map`, per stacked group (`mesh.sharded`):
- sharded group: the activation gradients travel to the owners the way pooled results
  came back (`mesh.routing.send_gradients`); each owner takes the ids it received in
  the forward pass, weighs every position's gradient, deduplicates the rows of its own
  block (one sort), sums each row's gradient once and applies the group's optimizer to
  those rows in place.
- data-parallel group: every device gathers the whole batch's rows and gradients of the
  group and applies the same update to its copy, which is what all-reducing the
  gradient would give.
The dedup, sum and optimizer run as one fused kernel where one applies
(`owner_update_path`): Pallas's `fused_update` on GPU and TPU, the CPU row-wise Adagrad
kernel on CPU; otherwise as XLA ops.

Row-wise Adagrad keeps one statistic per row, the mean of the squared (decayed)
gradient over the whole row. When rows are split into column shards on several devices,
each owner sums its columns per received position, the senders of the positions add up
what the shards of each row report and send the row's sum back
(`mesh.routing.exchange_statistic`, `mesh.bucketed.exchange_statistic`), so every shard
of a row sees the statistic the single-device update computes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mesh import bucketed, collectives, routing
from mesh.routing import FeatureRoute
from mesh.sharded import ShardedLayout, gather_logical
from mesh.sharded_lookup import Routed, RoutingOptions, local_rows, plan_routes
from recsys.lookup import coefficients
from recsys.sparse import JaggedBatch
from recsys.sparse_optim import Slots, row_optimizer
from recsys.sparse_update import (
    fused_rows_update,
    round_rows,
    round_slot_rows,
    rounding_seed,
    rows_update_path,
)
from recsys.specs import EmbeddingConfig, OptimizerKind, Pooling


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


def _apply(opt, step, seed, block, slot_block, unique, summed, row_mean_sq=None):
    """The optimizer on the unique rows of one block, written back in place (bfloat16 /
    float16 blocks and slots round stochastically; the bits are keyed by the block's rows,
    so they differ from a single-device run's: both are unbiased)."""
    values = block.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)
    slot_rows = {
        k: v.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32) for k, v in slot_block.items()
    }
    values, slot_rows = opt.update(values, summed, slot_rows, step, row_mean_sq=row_mean_sq)
    block = block.at[unique].set(round_rows(values, unique, block.dtype, seed), mode="drop")
    return block, {
        k: slot_block[k].at[unique].set(round_slot_rows(v, unique, slot_block[k].dtype, seed, k), mode="drop")
        for k, v in slot_rows.items()
    }


def _data_parallel_positions(layout, g, features, names, ids, coef, act_grads, axes):
    """The whole batch's positions of a data-parallel group on every device: their rows
    ([n], `block_rows` on padding) and weighted gradients [n, width]."""
    rows, grads = [], []
    for f in names:
        r, weight = local_rows(layout, features[f].table, ids[f], coef.get(f))
        # Gather ids, weights and bag gradients; weigh positions after the gather, so a
        # bag's gradient travels once, not once per position.
        a = collectives.gather_batch(act_grads[f].astype(jnp.float32), axes)
        a = a[:, None, :] if features[f].pooled else a
        r = collectives.gather_batch(r, axes)
        weight = (
            collectives.gather_batch(weight, axes) if f in coef else (r < g.block_rows).astype(jnp.float32)
        )
        rows.append(r.reshape(-1))
        grads.append((weight[..., None] * a).reshape(-1, g.width))
    return jnp.concatenate(rows), jnp.concatenate(grads)


def _broadcast_positions(route, received, act_grads, device, axes):
    """Every position this owner served on the broadcast route: its block row
    (`[sources, local_batch, columns]`, `block_rows` where none) and weighted gradient."""
    grads = routing.send_gradients(route, act_grads, axes)
    rows, weight = routing.owner_rows(route, received["ids"], received.get("coef"), device)
    return rows, routing.position_gradients(route, grads, weight, device)


def _pooled_positions(bucket, route, received, act_grads, axes):
    """The same on the "pooled" bucketized route (`mesh.bucketed`): the pooled gradients
    travel as on the broadcast route and spread over the served slots (`[sources,
    capacity]`)."""
    grads = routing.send_gradients(route, act_grads, axes)
    return received["served"], bucketed.slot_gradients(bucket, grads, received["at"], received["weight"])


def _row_statistic(spec, block, shape, exchange):
    """Row-wise Adagrad over column shards: (unique, summed, segment) of `_dedup` -> the
    whole row's mean squared gradient per unique row. `exchange` completes this shard's
    per-position partial sums (shaped `shape`) over the row's other column shards."""

    def statistic(unique, summed, segment):
        partial = _partial_statistic(spec, block, unique, summed, segment).reshape(shape)
        per_position = exchange(partial)
        return jnp.zeros(unique.shape, jnp.float32).at[segment].set(per_position.reshape(-1))

    return statistic


def _owner_update(path, spec, step, seed, block, slot_block, rows, grads, statistic=None):
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
        return fused_rows_update(path, spec, block, slot_block, (ids, ones, src, grads), step, seed)
    unique, summed, segment = _dedup(rows, grads, block_rows)
    row_mean_sq = None if statistic is None else statistic(unique, summed, segment)
    return _apply(row_optimizer(spec), step, seed, block, slot_block, unique, summed, row_mean_sq)


def owner_update_path(config: EmbeddingConfig, layout: ShardedLayout, group: str, kernels: str) -> str:
    """How the owners update `group`: `recsys.sparse_update.rows_update_path` on the shard
    width. Row-wise Adagrad over column shards needs the whole row's statistic, which only
    the XLA path takes, so it stays there."""
    g = next(x for x in layout.groups if x.name == group)
    table = config.table(g.tables[0])
    path = rows_update_path(table.dtype, g.width, table.optimizer, kernels)
    if g.strategy.column_split and table.optimizer.kind is OptimizerKind.ROWWISE_ADAGRAD:
        return "xla"
    return path


def _partial_statistic(spec, block, unique, summed, segment):
    """Per input position of `_dedup`: the sum over this block's columns of its row's
    squared (decayed) gradient, the part of row-wise Adagrad's statistic a column shard
    holds."""
    values = block.at[unique].get(mode="fill", fill_value=0).astype(jnp.float32)
    decayed = summed + spec.weight_decay * values if spec.weight_decay else summed
    return jnp.sum(jnp.square(decayed), axis=1)[segment]


def sharded_sparse_update(
    config: EmbeddingConfig,
    layout: ShardedLayout,
    mesh: jax.sharding.Mesh,
    storage: Mapping[str, jax.Array],
    slots: Mapping[str, Slots],
    routed: Routed,
    batch: JaggedBatch,
    act_grads: Mapping[str, jax.Array],
    step: jax.Array,
    options: RoutingOptions | None = None,
    kernels: str = "auto",
    order: jax.Array | None = None,
) -> tuple[dict[str, jax.Array], dict[str, Slots], jax.Array]:
    """Applies every group's optimizer to the rows the batch touched, on their owners.

    Args:
      layout, storage: from `mesh.sharded.sharded_layout` / `shard_logical`.
      slots: from `init_sharded_slots`.
      routed: what owners received in the forward pass (`mesh.sharded_lookup`).
      batch: the batch, sharded over all mesh axes.
      act_grads: {feature: [batch, dim] or [batch, max_ids, dim]}, batch-sharded.
      step: scalar int32, updates applied before this one.
      options: the routing options the forward pass used.
      kernels: how owners update their rows (`owner_update_path`): "auto" takes the fused
        Pallas update on GPU and TPU and the CPU row-wise Adagrad kernel on CPU where
        they apply; "xla", "cpu" or "pallas" as in `recsys.sparse_update.sparse_update`.
      order: the order of the step's collectives so far (`collectives.ordered_shard_map`).
    Returns:
      new (storage, slots), sharded as given, and the order after the update's collectives.
    """
    axes = tuple(mesh.axis_names)
    options = options or RoutingOptions()
    features = feature_routes(config)
    ids, coef = routing_inputs(config, batch)
    local_batch = batch.batch_size // mesh.devices.size
    routes, buckets = plan_routes(layout, features, local_batch, options)
    # Features whose ids the update reads on the batch owner: data-parallel and bucketized
    # rows (the pooled route's owners received all they need in the forward pass).
    rows_route = {name for name, b in buckets.items() if not b.pool_at_owner}
    local = sorted(
        f
        for f, r in features.items()
        if layout.table_group(r.table).data_parallel or layout.group_of[r.table] in rows_route
    )
    grad_features = sorted(act_grads)

    paths = {g.name: owner_update_path(config, layout, g.name, kernels) for g in layout.groups}

    def body(storage, slots, routed, ids, coef, act_grads, step):
        d = collectives.device_index(axes)
        new_storage, new_slots = dict(storage), dict(slots)
        for g in layout.groups:
            spec = config.table(g.tables[0]).optimizer
            # Owners' blocks number their rows from 0: seeded by device too. A data-parallel
            # group's copies must stay identical: the same seed everywhere.
            seed = rounding_seed(step, g.name) + (0 if g.data_parallel else d * 7919)
            update = functools.partial(_owner_update, paths[g.name], spec, step, seed)
            if g.data_parallel:
                names = [f for f in local if features[f].table in g.tables]
                if names:
                    rows, grads = _data_parallel_positions(
                        layout, g, features, names, ids, coef, act_grads, axes
                    )
                    new_storage[g.name], new_slots[g.name] = update(
                        storage[g.name], slots[g.name], rows, grads
                    )
                continue
            if g.name not in routes:
                continue  # no feature reads this group
            block, slot_block = storage[g.name][0], {k: v[0] for k, v in slots[g.name].items()}
            received = routed[g.name]

            def broadcast(
                block, slot_block, route=routes[g.name], received=received, spec=spec, update=update
            ):
                rows, grads = _broadcast_positions(route, received, act_grads, d, axes)
                statistic = None
                if spec.kind is OptimizerKind.ROWWISE_ADAGRAD and route.column_split:
                    exchange = functools.partial(routing.exchange_statistic, route, axes=axes)
                    statistic = _row_statistic(spec, block, rows.shape, exchange)
                return update(block, slot_block, rows, grads, statistic)

            if g.name in buckets:

                def via_buckets(
                    block,
                    slot_block,
                    bucket=buckets[g.name],
                    route=routes[g.name],
                    received=received,
                    spec=spec,
                    update=update,
                ):
                    if bucket.pool_at_owner:
                        rows, grads = _pooled_positions(bucket, route, received, act_grads, axes)
                        statistic = None
                        if spec.kind is OptimizerKind.ROWWISE_ADAGRAD and bucket.column_split:
                            exchange = lambda partial: bucketed.exchange_statistic(  # noqa: E731
                                bucket, partial, received["owner"], received["slot"], axes
                            )
                            statistic = _row_statistic(spec, block, rows.shape, exchange)
                        return update(block, slot_block, rows, grads, statistic)
                    grads = bucketed.send_gradients(
                        bucket, act_grads, received["owner"], received["slot"], coef, ids, axes
                    )
                    return update(block, slot_block, received["served"], grads)

                block, slot_block = collectives.cond(
                    received["fallback"], broadcast, via_buckets, block, slot_block
                )
            else:
                block, slot_block = broadcast(block, slot_block)
            new_storage[g.name], new_slots[g.name] = block[None], {k: v[None] for k, v in slot_block.items()}
        return new_storage, new_slots

    batch_spec = P(axes)
    storage_specs = {g.name: g.partition_spec(axes) for g in layout.groups}
    slot_specs = {g.name: {k: g.partition_spec(axes) for k in slots[g.name]} for g in layout.groups}
    routed_specs = {
        name: {k: P() if k == "fallback" else batch_spec for k in received}
        for name, received in routed.items()
    }
    scaled = [f for f in local if f in coef]
    mapped = collectives.ordered_shard_map(
        body,
        mesh=mesh,
        in_specs=(
            storage_specs,
            slot_specs,
            routed_specs,
            {f: batch_spec for f in local},
            {f: batch_spec for f in scaled},
            {f: batch_spec for f in grad_features},
            P(),
        ),
        out_specs=(storage_specs, slot_specs),
        # Pallas interprets a kernel (on CPU) by evaluating its body at lowering, where
        # varying blocks meet its invariant grid indices and the varying-axes check fails
        # (jax 0.10); compiled kernels lower to one custom call and keep the check.
        check_vma=not (jax.default_backend() == "cpu" and "pallas" in paths.values()),
    )
    order, (storage, slots) = mapped(
        order,
        {g.name: storage[g.name] for g in layout.groups},
        {g.name: slots[g.name] for g in layout.groups},
        routed,
        {f: ids[f] for f in local},
        {f: coef[f] for f in scaled},
        {f: act_grads[f] for f in grad_features},
        jnp.asarray(step, jnp.int32),
    )
    return storage, slots, order


def logical_slots(layout: ShardedLayout, slots) -> dict[str, dict[str, np.ndarray]]:
    """{table: {slot: [rows, ...]}} gathered to the host (tests, small tables)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    kinds = {k for g in layout.groups for k in slots[g.name]}
    for kind in kinds:
        groups = [g for g in layout.groups if kind in slots[g.name]]
        sub = type(layout)(tuple(groups), layout.table_shapes, layout.group_of)
        for table, value in gather_logical(sub, {g.name: slots[g.name][kind] for g in groups}).items():
            out.setdefault(table, {})[kind] = value
    for table in layout.table_shapes:
        out.setdefault(table, {})
    return out
