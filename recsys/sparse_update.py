"""The sparse half of the split train step: activation gradients -> updated table rows.

For every table: collect the batch's occurrences of its ids, deduplicate them, sum each
unique row's gradient exactly once (in a deterministic order), and apply the table's
row optimizer to those rows in place. No `[rows, dim]` gradient is ever formed; the
largest temporary is `[occurrences of one table, dim]`, because tables are processed one
after another inside a `lax.scan` (tables with equal occurrence counts share a scan).

Dedup uses a sort-free marker when the table is not much larger than the batch's
occurrence count (scatter-min of positions into a `[rows]` int32 array: the first
position of each id represents it), and a sort otherwise; both give the same slots.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu as cpu_kernels
from pallas_kernels.fused_update import RowOptimizer, fused_update, random_bits, round_state, stochastic_round
from recsys.kernels import rows_update_path
from recsys.layout import EmbeddingLayout, TableGroup, build_layout
from recsys.lookup import Activations, group_inputs
from recsys.sparse import JaggedBatch
from recsys.sparse_optim import Slots, row_optimizer
from recsys.specs import EmbeddingConfig, SparseOptimizerSpec

# Marker dedup when rows <= this x occurrences; above it the [rows] marker costs more
# to clear than sorting the occurrences.
_MARKER_MAX_RATIO = 64
# Unique rows handed to the row optimizer at a time.
_OPTIMIZER_CHUNK = 2048
# Gradient accumulators up to this size are allocated per table, larger ones reused.
_FRESH_ACCUMULATOR_BYTES = 8 << 20


def init_slots(config: EmbeddingConfig) -> dict[str, Slots]:
    """Optimizer slots for every table group: {group: {slot: [total_rows, ...]}}."""
    layout = build_layout(config)
    return {g.name: row_optimizer(g.optimizer).init(g.total_rows, g.dim) for g in layout.table_groups}


def _occurrences(layout: EmbeddingLayout, group: TableGroup, batch: JaggedBatch, act_grads):
    """Flattens every id occurrence of a table group's features.

    Returns:
      ids: [n] int32 stacked-row id, -1 on padding positions.
      coef: [n] float32 factor applied to the source gradient row.
      src: [n] int32 index of the occurrence's gradient row in `grad_rows`.
      grad_rows: [m, dim] float32 activation gradients (pooled: one row per sample).
      spans: {table: [(start, stop), ...]} where each feature's occurrences lie in [0, n).
    """
    ids_parts, coef_parts, src_parts, grad_parts = [], [], [], []
    spans: dict[str, list[tuple[int, int]]] = {}
    n = m = 0
    for lookup in layout.lookup_groups:
        if lookup.table_group != group.name:
            continue
        ids, coef = group_inputs(layout, lookup, batch)  # [f, b, l]
        valid = jnp.stack([batch[f.name].valid_mask() for f in lookup.features])
        nf, nb, nl = ids.shape
        # [f, b, ...]: each feature's gradients contiguous, as its occurrences are. Reading
        # the model's [b, f, ...] in place would skip this copy but scatter a table's
        # gradient reads over all of it, which made the CPU kernel's update no faster.
        grads = jnp.moveaxis(act_grads.groups[lookup.name].astype(jnp.float32), 1, 0)
        if lookup.sequence:
            src = np.arange(nf * nb * nl, dtype=np.int32).reshape(nf, nb, nl)
        else:
            src = np.broadcast_to(np.arange(nf * nb, dtype=np.int32).reshape(nf, nb, 1), (nf, nb, nl))
        ids_parts.append(jnp.where(valid, ids, -1).reshape(-1))
        coef_parts.append(coef.reshape(-1))
        src_parts.append(jnp.asarray(src.reshape(-1) + m))
        grad_parts.append(grads.reshape(-1, group.dim))
        for i, feature in enumerate(lookup.features):
            start = n + i * nb * nl
            spans.setdefault(feature.table, []).append((start, start + nb * nl))
        n += nf * nb * nl
        m += grads.reshape(-1, group.dim).shape[0]
    cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return cat(ids_parts), cat(coef_parts), cat(src_parts), cat(grad_parts), spans


def _dedup_marker(local: jax.Array, valid: jax.Array, rows: int, capacity: int):
    """Slots by first occurrence.

    Returns:
      slot: [n] int32, the occurrence's unique slot in [0, unique), `capacity` if invalid.
      unique_local: [capacity] int32 table-local row of each slot, -1 past `unique`.
      unique: scalar int32 count of distinct valid ids.
    """
    n = local.shape[0]
    position = jnp.arange(n, dtype=jnp.int32)
    target = jnp.where(valid, local, rows)
    first = jnp.full((rows,), n, jnp.int32).at[target].min(position, mode="drop")
    representative = first.at[target].get(mode="fill", fill_value=n)
    is_first = valid & (representative == position)
    slot_of_position = jnp.cumsum(is_first, dtype=jnp.int32) - 1
    slot = jnp.where(valid, slot_of_position.at[representative].get(mode="fill", fill_value=0), capacity)
    unique_local = jnp.full((capacity,), -1, jnp.int32)
    unique_local = unique_local.at[jnp.where(is_first, slot_of_position, capacity)].set(local, mode="drop")
    return slot, unique_local, slot_of_position[-1] + 1


def _dedup_sort(local: jax.Array, valid: jax.Array, rows: int, capacity: int):
    """Same contract as `_dedup_marker`, by a stable sort of the ids (slots in id order)."""
    n = local.shape[0]
    key = jnp.where(valid, local, rows)
    order = jnp.argsort(key, stable=True)
    ordered = key[order]
    is_first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]]) & (ordered < rows)
    segment = jnp.cumsum(is_first, dtype=jnp.int32) - 1
    sorted_slot = jnp.where(ordered < rows, segment, capacity)
    slot = jnp.zeros((n,), jnp.int32).at[order].set(sorted_slot)
    unique_local = jnp.full((capacity,), -1, jnp.int32)
    unique_local = unique_local.at[jnp.where(is_first, segment, capacity)].set(ordered, mode="drop")
    return slot, unique_local, jnp.sum(is_first, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class _XlaUpdate:
    """How the XLA path deduplicates and updates (`sparse_update`'s testing and tuning hooks)."""

    dedup: str
    max_chunk: int
    accumulator: str


def _update_tables_scan(
    group: TableGroup,
    table,
    slots,
    occurrences,
    offsets,
    rows,
    step,
    options: _XlaUpdate,
    keys=None,
    choice_rows=None,
):
    """Runs dedup + gradient sum + optimizer for each table of `occurrences` (ids, coef,
    src: [tables, n]; grad_rows: [m, dim]), one table after another."""
    ids, coef, src, grad_rows = occurrences
    dedup, max_chunk, accumulator = options.dedup, options.max_chunk, options.accumulator
    n = ids.shape[1]
    # Unique rows are at most min(occurrences, rows); the optimizer walks them in chunks
    # and stops after the last used chunk, so its cost follows the unique count rather
    # than this static worst case (at pooling 20 most ids repeat).
    chunk = min(n, rows, max_chunk)
    capacity = -(-min(n, rows) // chunk) * chunk
    # The two dedups may sum a row's gradients in another order: the choice follows the
    # tables' logical sizes, so a cache's slots sum as their full table does.
    choice_rows = rows if choice_rows is None else choice_rows
    use_marker = dedup == "marker" or (dedup == "auto" and choice_rows <= _MARKER_MAX_RATIO * n)
    find_slots = _dedup_marker if use_marker else _dedup_sort
    oob = group.total_rows  # an index past the stacked array: gathers fill, scatters drop
    apply_chunk = _chunk_update(
        row_optimizer(group.optimizer), step, rounding_seed(step, group.name), chunk, keys
    )

    def zero_chunk(i, grad_sum):
        zeros = jnp.zeros((chunk, group.dim), jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(grad_sum, zeros, i * chunk, 0)

    # A large accumulator is zeroed once and carried from table to table, each table
    # re-zeroing only the chunks it used (clearing all of it per table cost as much as the
    # scatter-add). A small one is cheaper to allocate fresh (a carried buffer costs two
    # copies per table).
    reuse_accumulator = accumulator == "reused" or (
        accumulator == "auto" and capacity * group.dim * 4 > _FRESH_ACCUMULATOR_BYTES
    )

    def one_table(carry, x):
        table, slots, grad_sum = carry
        ids_t, coef_t, src_t, offset = x
        valid = ids_t >= 0
        slot, unique_local, count = find_slots(ids_t - offset, valid, rows, capacity)
        contrib = grad_rows.at[src_t].get(mode="promise_in_bounds") * coef_t[:, None]
        if not reuse_accumulator:
            grad_sum = jnp.zeros((capacity, group.dim), jnp.float32)
        grad_sum = grad_sum.at[slot].add(contrib, mode="drop")
        unique = jnp.where(unique_local >= 0, unique_local + offset, oob)
        chunks = (count + chunk - 1) // chunk
        table, slots, _, grad_sum = jax.lax.fori_loop(
            0, chunks, apply_chunk, (table, slots, unique, grad_sum)
        )
        if reuse_accumulator:  # a second loop, after every read of the accumulator
            grad_sum = jax.lax.fori_loop(0, chunks, zero_chunk, grad_sum)
        return (table, slots, grad_sum if reuse_accumulator else None), None

    grad_sum = jnp.zeros((capacity, group.dim), jnp.float32) if reuse_accumulator else None
    (table, slots, _), _ = jax.lax.scan(one_table, (table, slots, grad_sum), (ids, coef, src, offsets))
    return table, slots


def _chunk_update(optimizer, step, seed, chunk: int, keys=None):
    """`optimizer` (`recsys.sparse_optim.row_optimizer`) on chunk i of the unique rows:
    `fori_loop`'s body over (table, slots, unique rows, summed gradients). `keys`: the
    row each stored row draws its rounding bits for (None: itself)."""

    def apply_chunk(i, carry):
        table, slots, unique, grad_sum = carry  # grad_sum is only read here
        rows_i = jax.lax.dynamic_slice_in_dim(unique, i * chunk, chunk)
        grads_i = jax.lax.dynamic_slice_in_dim(grad_sum, i * chunk, chunk)
        values = table.at[rows_i].get(mode="fill", fill_value=0).astype(jnp.float32)
        slot_rows = {
            k: v.at[rows_i].get(mode="fill", fill_value=0).astype(jnp.float32) for k, v in slots.items()
        }
        new_values, new_slot_rows = optimizer.update(values, grads_i, slot_rows, step)
        bits = keyed_rows(rows_i, keys)
        table = table.at[rows_i].set(round_rows(new_values, bits, table.dtype, seed), mode="drop")
        slots = {
            k: v.at[rows_i].set(round_slot_rows(new_slot_rows[k], bits, v.dtype, seed, k), mode="drop")
            for k, v in slots.items()
        }
        return table, slots, unique, grad_sum

    return apply_chunk


def keyed_rows(rows: jax.Array, keys: jax.Array | None) -> jax.Array:
    """The rows whose rounding bits `rows` draw: their `keys` (0 past the end), or themselves."""
    return rows if keys is None else keys.at[rows].get(mode="fill", fill_value=0)


def keyed_update_path(path: str) -> str:
    """The update path of rows with rounding keys: the CPU kernel draws its bits from the
    stored row, so keyed rows take XLA there; Pallas and XLA read the keys."""
    return "xla" if path == "cpu" else path


def rounding_seed(step: jax.Array, group: str) -> jax.Array:
    """The stochastic-rounding seed of a table group's update at `step`: fixed by the step
    and the group's name, so a run is deterministic and resumes exactly."""
    return jnp.asarray(step, jnp.int32) * 1_000_003 + np.int32(zlib.crc32(group.encode()) & 0x7FFFFFFF)


def round_rows(values: jax.Array, rows: jax.Array, dtype, seed: jax.Array) -> jax.Array:
    """Updated float32 rows [n, dim] in the table's dtype: bfloat16 / float16 tables round
    stochastically (unbiased, so small updates survive on average), from bits hashed from
    (seed, row, column) as the Pallas kernels do."""
    if jnp.dtype(dtype) == jnp.float32:
        return values
    bits = random_bits(seed, rows[:, None], jnp.arange(values.shape[1])[None, :])
    return stochastic_round(values, bits, dtype)


def round_slot_rows(values: jax.Array, rows: jax.Array, dtype, seed: jax.Array, name: str) -> jax.Array:
    """Updated float32 rows of optimizer slot `name` ([n] or [n, dim]) in its storage
    dtype: narrow state rounds stochastically with the Pallas kernels' bits
    (`pallas_kernels.fused_update.round_state`; a [n] slot is column 0)."""
    if jnp.dtype(dtype) == jnp.float32:
        return values
    flat = values.reshape(values.shape[0], -1)
    columns = jnp.arange(flat.shape[1])[None, :]
    return round_state(flat, seed, name, rows[:, None], columns, dtype).reshape(values.shape)


def update_path(group: TableGroup, kernels: str) -> str:
    """ "pallas", "cpu" or "xla": how `group` is updated (`recsys.kernels.rows_update_path`)."""
    return rows_update_path(group.dtype, group.dim, group.optimizer, kernels)


def kernel_row_optimizer(spec: SparseOptimizerSpec) -> RowOptimizer:
    """The Pallas fused update's hyperparameters of `spec`."""
    return RowOptimizer(
        kind=spec.kind.value,
        learning_rate=spec.learning_rate,
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        beta1=spec.beta1,
        beta2=spec.beta2,
    )


def fused_rows_update(
    path: str, spec: SparseOptimizerSpec, table, slots: Slots, occurrences, step, seed, keys=None
):
    """One fused kernel call ("pallas" or "cpu", see `rows_update_path`): occurrences
    `(ids [n], coef [n], src [n], grads [m, dim])` summed per row and the optimizer applied
    to the rows in place; ids outside the table are skipped. `keys`: [rows] the row each
    stored row rounds as (Pallas only). Returns (table, slots)."""
    ids, coef, src, grads = occurrences
    if path == "pallas":
        optimizer = kernel_row_optimizer(spec)
        return fused_update(
            table,
            slots,
            ids,
            coef,
            src,
            grads,
            optimizer=optimizer,
            step=step,
            lr_scale=spec.rate_scale(step),
            seed=seed,
            row_keys=keys,
        )
    if path != "cpu" or keys is not None:
        raise ValueError(f"no fused kernel for path {path!r}" + (" with row keys" if path == "cpu" else ""))
    table, acc = cpu_kernels.rowwise_adagrad(
        table,
        slots["acc"],
        ids,
        coef,
        src,
        grads,
        learning_rate=spec.rate(step),
        eps=spec.eps,
        weight_decay=spec.weight_decay,
    )
    return table, {"acc": acc}


def _xla_group_update(group: TableGroup, table, slots, occurrences, step, options, keys, logical_rows):
    """One group's update on the XLA path; tables with the same occurrence count share one
    scan (no padding needed). Returns (table, slots)."""
    ids, coef, src, grad_rows, spans = occurrences
    buckets: dict[int, list] = {}
    for spec, offset in zip(group.tables, group.row_offsets):
        index = np.concatenate([np.arange(a, b) for a, b in spans[spec.name]])
        buckets.setdefault(len(index), []).append(
            (index, offset, spec.rows, logical_rows.get(spec.name, spec.rows))
        )
    for members in buckets.values():
        index = np.stack([m[0] for m in members])  # [tables, occurrences]
        offsets = jnp.asarray([m[1] for m in members], jnp.int32)
        table, slots = _update_tables_scan(
            group,
            table,
            slots,
            (ids[index], coef[index], src[index], grad_rows),
            offsets,
            max(m[2] for m in members),
            step,
            options,
            keys,
            max(m[3] for m in members),
        )
    return table, slots


def sparse_update(
    config: EmbeddingConfig,
    tables: dict[str, jax.Array],
    slots: dict[str, Slots],
    batch: JaggedBatch,
    act_grads: Activations,
    step: jax.Array,
    *,
    dedup: str = "auto",
    optimizer_chunk: int = _OPTIMIZER_CHUNK,
    accumulator: str = "auto",
    kernels: str = "auto",
    row_keys: dict[str, jax.Array] | None = None,
    logical_rows: dict[str, int] | None = None,
) -> tuple[dict[str, jax.Array], dict[str, Slots]]:
    """Applies each table's optimizer to the rows `batch` touched.

    Args:
      tables: {group: [total_rows, dim]} stacked tables.
      slots: {group: slot arrays} from `init_slots`.
      batch: the batch the activations were looked up from.
      act_grads: d loss / d activations, as returned by differentiating `lookup`'s output.
      step: scalar int32, the number of updates applied before this one (Adam's t - 1).
      dedup: "auto", "marker" or "sort" (testing hook; all give the same result).
      optimizer_chunk: unique rows the optimizer updates at a time (tuning and testing).
      accumulator: "auto", "fresh" or "reused": whether each table allocates its gradient
        accumulator or reuses one zeroed buffer ("auto" decides by size; same result).
      kernels: "auto", "xla", "cpu" or "pallas" (`recsys.kernels`). "auto"
        takes the Pallas fused update (`pallas_kernels.fused_update`, every optimizer;
        bfloat16/float16 tables rounded stochastically) on GPU and TPU, and on CPU runs
        row-wise Adagrad on float32 tables through the fused CPU kernel when it was built.
        All paths give the same result up to float rounding (`tests/test_cpu_kernels.py`,
        `tests/test_kernel_dispatch.py`).
      row_keys: {group: [total_rows] int32}, the row whose stochastic-rounding bits each
        stored row draws (a cache's slots draw their ids' bits, `recsys.cache`); read by
        narrow groups, on the XLA or Pallas path (`keyed_update_path`). None: every row
        its own.
      logical_rows: {table: rows} the "auto" dedup choice assumes (a cache's full table
        sizes, so its slots sum gradients in the same order); None: the stored rows.
    Returns:
      new (tables, slots); only the touched rows differ.
    """
    if dedup not in ("auto", "marker", "sort"):
        raise ValueError(f"dedup must be 'auto', 'marker' or 'sort', got {dedup!r}")
    if accumulator not in ("auto", "fresh", "reused"):
        raise ValueError(f"accumulator must be 'auto', 'fresh' or 'reused', got {accumulator!r}")
    if optimizer_chunk < 1:
        raise ValueError(f"optimizer_chunk must be >= 1, got {optimizer_chunk}")
    layout = build_layout(config)
    tables, slots = dict(tables), dict(slots)
    options = _XlaUpdate(dedup, optimizer_chunk, accumulator)
    for group in layout.table_groups:
        ids, coef, src, grad_rows, spans = _occurrences(layout, group, batch, act_grads)
        narrow = group.tables[0].rounds_stochastically
        keys = None if row_keys is None or not narrow else row_keys.get(group.name)
        path = update_path(group, kernels)
        if keys is not None:
            path = keyed_update_path(path)
        if path != "xla":
            # Narrow tables round stochastically, from bits seeded by the step and the group.
            tables[group.name], slots[group.name] = fused_rows_update(
                path,
                group.optimizer,
                tables[group.name],
                slots[group.name],
                (ids, coef, src, grad_rows),
                step,
                rounding_seed(step, group.name),
                keys,
            )
            continue
        tables[group.name], slots[group.name] = _xla_group_update(
            group,
            tables[group.name],
            slots[group.name],
            (ids, coef, src, grad_rows, spans),
            step,
            options,
            keys,
            logical_rows or {},
        )
    return tables, slots
