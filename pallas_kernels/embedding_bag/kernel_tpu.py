"""TPU (Mosaic) flavour of the embedding bag: scalar-prefetched ids, rows by manual DMA.

The grid walks blocks of `bags_per_step` bags in order. Ids and bag lengths are scalar-
prefetched into SMEM; each valid position's row is copied from the table in HBM into a
VMEM buffer by its own DMA, and the buffer is double buffered across grid steps: a step
first starts the copies of the next block's rows, then waits for its own and pools them
on the vector unit. Only positions before a bag's length are copied; coefficients (sum,
mean, weights; 0 on padding) arrive as an ordinary VMEM block.

Because each step prefetches for the next, the grid runs sequentially ("arbitrary"). SMEM
is small, so the wrapper splits a large batch into calls of at most `max_prefetch_ids`
ids. Verified in interpret mode only: no TPU is available to this project's CI.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import platform


def _bag_kernel(ids_smem, lengths_smem, coef_ref, table_hbm, out_ref, rows_vmem, sems, *, pooled):
    # ids_smem: [bags * bag] int32 (prefetched); lengths_smem: [bags] int32 (prefetched).
    # coef_ref: [block, bag] float32; table_hbm: [rows, dim] in HBM.
    # out_ref: [block, dim] (pooled) or [block, bag, dim]; rows_vmem: [2, block, bag, dim].
    block, width = coef_ref.shape
    step = pl.program_id(0)
    steps = pl.num_programs(0)

    def for_each_row(block_index, slot, action):
        def per_bag(b, carry):
            bag_index = block_index * block + b

            def per_position(l, carry):
                # Clamped: a stray id must not become a DMA outside the table (the batch
                # packer rejects out-of-range ids; this only keeps a bypass from faulting).
                row = jnp.clip(ids_smem[bag_index * width + l], 0, table_hbm.shape[0] - 1)
                copy = pltpu.make_async_copy(
                    table_hbm.at[pl.ds(row, 1)], rows_vmem.at[slot, b, pl.ds(l, 1)], sems.at[slot]
                )
                copy.start() if action == "start" else copy.wait()
                return carry

            return jax.lax.fori_loop(0, lengths_smem[bag_index], per_position, carry)

        jax.lax.fori_loop(0, block, per_bag, 0)

    slot = step % 2

    @pl.when(step == 0)
    def _():
        for_each_row(step, slot, "start")

    @pl.when(step + 1 < steps)
    def _():
        for_each_row(step + 1, 1 - slot, "start")

    for_each_row(step, slot, "wait")
    coef = coef_ref[...]
    rows = rows_vmem[slot].astype(jnp.float32)  # [block, bag, dim]
    # Positions never copied hold stale bytes: select, do not multiply, so they add 0.
    scaled = jnp.where((coef != 0)[..., None], rows * coef[..., None], 0.0)
    out_ref[...] = jnp.sum(scaled, axis=1) if pooled else scaled


@functools.partial(jax.jit, static_argnames=("pooled", "bags_per_step", "interpret"))
def bag_call(table, ids, lengths, coef, *, pooled: bool, bags_per_step: int, interpret: bool):
    """One pallas_call over bags.

    Args:
      table: [rows, dim]; ids: [bags, bag] int32; lengths: [bags] int32; coef: [bags, bag]
        float32; bags a multiple of `bags_per_step`.
    Returns:
      [bags, dim] float32 (pooled) or [bags, bag, dim].
    """
    bags, width = ids.shape
    dim = table.shape[1]
    block = bags_per_step
    out_block = (block, dim) if pooled else (block, width, dim)
    out_shape = (bags, dim) if pooled else (bags, width, dim)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,  # ids (flattened) and bag lengths, read as scalars
        grid=(bags // block,),
        in_specs=[
            pl.BlockSpec((block, width), lambda i, *_: (i, 0)),
            pl.BlockSpec(memory_space=pl.ANY),  # the table stays in HBM; rows come by DMA
        ],
        out_specs=pl.BlockSpec(out_block, lambda i, *_: (i,) + (0,) * (len(out_block) - 1)),
        scratch_shapes=[
            pltpu.VMEM((2, block, width, dim), table.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    return pl.pallas_call(
        functools.partial(_bag_kernel, pooled=pooled),
        grid_spec=grid_spec,
        out_shape=platform.output_struct(out_shape, jnp.float32, ids, lengths, coef, table),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(ids.reshape(-1), lengths, coef, table)
