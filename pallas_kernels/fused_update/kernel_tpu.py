"""TPU (Mosaic) flavour of the fused backward + optimizer: blocks of unique rows by DMA.

Grid step k owns unique rows k*block .. k*block+block-1 of the sorted segments (their row
ids and segment bounds arrive as SMEM blocks). The step
  1. starts DMAs of its rows and their optimizer state from HBM into VMEM;
  2. per row, walks its occurrences in windows of `window`: one DMA brings the window's
     gradient-row ids and coefficients into SMEM, then one DMA per occurrence brings its
     gradient row into VMEM, all in flight together, and they are summed in batch order;
  3. waits for the rows, applies the optimizer to the whole `[block, dim]` block on the
     vector unit (stochastic rounding for a narrow table and state), and DMAs the rows back in place
     (the table and state are aliased to the outputs).
Rows of a block past the unique count are computed on stale VMEM but never written.
Verified in interpret mode only: no TPU is available to this project's CI.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platform
from pallas_kernels.fused_update.optimizers import RowOptimizer
from pallas_kernels.fused_update.rounding import random_bits, round_state, stochastic_round


def _update_kernel(count_smem, seed_smem, scalars_smem, *refs, optimizer, rounding, state_rounding, window):
    # count_smem, seed_smem: [1] int32 (prefetched); scalars_smem: [1, 3] float32. Then in HBM:
    # [4, slots] int32 (unique rows, segment starts, segment ends, the rows their rounding
    # bits are keyed by), src [1, n + window] int32,
    # coef [1, n + window] float32 (2-D: Mosaic tiles rank-1 HBM arrays), grads [m, dim],
    # table, state...; their aliased outputs (the same buffers); then scratch.
    n_state = len(optimizer.state_names())
    segments_hbm, src_hbm, coef_hbm, grads_hbm, table_in, *refs = refs
    state_in, refs = refs[:n_state], refs[n_state:]
    table_out, state_out, refs = refs[0], refs[1 : 1 + n_state], refs[1 + n_state :]
    rows_vmem, state_vmem, refs = refs[0], refs[1 : 1 + n_state], refs[1 + n_state :]
    grad_vmem, window_vmem, segments_smem, src_window, coef_window, row_sems, sem = refs
    block = segments_smem.shape[1]
    first = pl.program_id(0) * block
    live = jnp.clip(count_smem[0] - first, 0, block)
    # This step's unique rows and segment bounds, HBM -> SMEM (SMEM cannot hold them all).
    bounds = pltpu.make_async_copy(segments_hbm.at[:, pl.ds(first, block)], segments_smem, sem.at[0])
    bounds.start()
    bounds.wait()
    rows_smem, starts_smem, ends_smem = segments_smem.at[0], segments_smem.at[1], segments_smem.at[2]
    buffers = (rows_vmem, *state_vmem)

    def copies(r, write=False):
        """The DMAs of row slot r and its state: HBM -> VMEM, or back when `write`."""
        return _row_copies(
            rows_smem[r],
            r,
            buffers,
            (table_out, *state_out) if write else (table_in, *state_in),
            row_sems,
            write,
        )

    def each_live_row(body):
        jax.lax.fori_loop(0, live, lambda r, c: (body(r), c)[1], 0)

    each_live_row(lambda r: [c.start() for c in copies(r)])
    gradients = (src_hbm, coef_hbm, grads_hbm, src_window, coef_window, window_vmem, sem)
    each_live_row(
        lambda r: _sum_gradient(gradients, starts_smem[r], ends_smem[r], grad_vmem.at[pl.ds(r, 1), :], window)
    )
    each_live_row(lambda r: [c.wait() for c in copies(r)])

    values = rows_vmem[...].astype(jnp.float32)
    state = tuple(s[...].astype(jnp.float32) for s in state_vmem)
    values, state = optimizer.apply(
        values, grad_vmem[...], state, (scalars_smem[0, 0], scalars_smem[0, 1], scalars_smem[0, 2])
    )
    row_ids = _row_ids(segments_smem.at[3], block) if rounding or state_rounding else None
    if rounding:
        columns = jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)
        rows_vmem[...] = stochastic_round(
            values, random_bits(seed_smem[0], row_ids, columns), rows_vmem.dtype
        )
    else:
        rows_vmem[...] = values.astype(rows_vmem.dtype)
    for name, buf, value in zip(optimizer.state_names(), state_vmem, state):
        if state_rounding:
            columns = jax.lax.broadcasted_iota(jnp.int32, value.shape, 1)
            value = round_state(value, seed_smem[0], name, row_ids, columns, buf.dtype)
        buf[...] = value.astype(buf.dtype)
    each_live_row(lambda r: [c.start() for c in copies(r, write=True)])
    each_live_row(lambda r: [c.wait() for c in copies(r, write=True)])


def _row_copies(row, r, buffers, hbm, sems, write: bool):
    """DMAs between row `row` of each HBM array (table, state...) and slot r of its VMEM
    buffer: into VMEM, or out of it when `write`."""
    out = []
    for i, (buf, array) in enumerate(zip(buffers, hbm)):
        here, there = buf.at[pl.ds(r, 1)], array.at[pl.ds(row, 1)]
        out.append(
            pltpu.make_async_copy(here, there, sems.at[i])
            if write
            else pltpu.make_async_copy(there, here, sems.at[i])
        )
    return out


def _sum_gradient(gradients, start, end, out, window: int):
    """out [1, dim] = sum over occurrences [start, end) of coef * grads[src], reading the
    occurrences' src and coef `window` at a time and their gradient rows by DMA."""
    src_hbm, coef_hbm, grads_hbm, src_window, coef_window, window_vmem, sem = gradients

    def one_window(w, acc):
        offset = start + w * window
        index_copies = [
            pltpu.make_async_copy(src_hbm.at[:, pl.ds(offset, window)], src_window, sem.at[0]),
            pltpu.make_async_copy(coef_hbm.at[:, pl.ds(offset, window)], coef_window, sem.at[1]),
        ]
        for c in index_copies:
            c.start()
        for c in index_copies:
            c.wait()
        size = jnp.minimum(window, end - offset)

        def grad_copy(j):
            return pltpu.make_async_copy(
                grads_hbm.at[pl.ds(src_window[0, j], 1)], window_vmem.at[pl.ds(j, 1)], sem.at[2]
            )

        jax.lax.fori_loop(0, size, lambda j, c: (grad_copy(j).start(), c)[1], 0)
        jax.lax.fori_loop(0, size, lambda j, c: (grad_copy(j).wait(), c)[1], 0)
        add = lambda j, acc: acc + coef_window[0, j] * window_vmem[pl.ds(j, 1), :].astype(jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, size, add, acc)

    windows = jax.lax.div(end - start + window - 1, window)  # lax.div: no sign fix-up
    out[...] = jax.lax.fori_loop(0, windows, one_window, jnp.zeros(out.shape, jnp.float32))


def _row_ids(rows_smem, block: int):
    """[block, 1] int32: the table row of each slot, from SMEM into a vector (one select
    per row), for the rounding bits."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)
    row_ids = jnp.zeros((block, 1), jnp.int32)
    for r in range(block):
        row_ids = jnp.where(rows == r, rows_smem[r], row_ids)
    return row_ids


@functools.partial(
    jax.jit,
    static_argnames=("optimizer", "rounding", "state_rounding", "rows_per_step", "window", "interpret"),
)
def update_call(
    table,
    state,
    segments,
    keys,
    grads,
    seed,
    scalars,
    *,
    optimizer: RowOptimizer,
    rounding,
    state_rounding,
    rows_per_step,
    window,
    interpret,
):
    """One pallas_call; `state` is a tuple of [rows, width] arrays. Returns (table, state).

    `segments.src` / `.coef` must carry `window` padding entries (windows may overrun)."""
    n = segments.rows.shape[0]
    block = rows_per_step
    steps = -(-n // block)
    pad = steps * block - n
    bounds = jnp.stack([segments.rows, segments.starts[:-1], segments.starts[1:], keys])
    bounds = jnp.pad(bounds, ((0, 0), (0, pad)))  # [4, steps * block]
    dim = table.shape[1]
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    operands = (scalars[None], bounds, segments.src[None], segments.coef[None], grads, table) + tuple(state)
    out_shape = tuple(platform.output_struct(x.shape, x.dtype, *operands) for x in (table, *state))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,  # the unique-row count and the rounding seed
        grid=(steps,),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + [hbm] * (len(operands) - 1),
        out_specs=[hbm] * len(out_shape),
        scratch_shapes=[
            pltpu.VMEM((block, dim), table.dtype),
            *[pltpu.VMEM((block, s.shape[1]), s.dtype) for s in state],
            pltpu.VMEM((block, dim), jnp.float32),  # summed gradients
            pltpu.VMEM((window, dim), grads.dtype),  # one window's gradient rows
            pltpu.SMEM((4, block), jnp.int32),  # this step's rows, starts, ends, rounding keys
            pltpu.SMEM((1, window), jnp.int32),
            pltpu.SMEM((1, window), jnp.float32),
            pltpu.SemaphoreType.DMA((1 + len(state),)),
            pltpu.SemaphoreType.DMA((3,)),
        ],
    )
    # Operand indices count the two prefetched scalars first.
    first_aliased = 2 + len(operands) - len(out_shape)
    out = pl.pallas_call(
        functools.partial(
            _update_kernel,
            optimizer=optimizer,
            rounding=rounding,
            state_rounding=state_rounding,
            window=window,
        ),
        grid_spec=grid_spec,
        out_shape=out_shape,
        input_output_aliases={first_aliased + i: i for i in range(len(out_shape))},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(segments.count, seed, *operands)
    return out[0], tuple(out[1:])
