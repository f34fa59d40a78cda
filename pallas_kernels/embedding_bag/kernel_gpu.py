"""GPU (Triton) flavour of the embedding bag: one program pools a block of bags.

Program (f, i) owns bags i*block .. i*block+block-1 of feature f. It walks the bag
positions up to the longest bag of its block and, per position, gathers the block's rows
as one `[block, dim]` vector load from the table, scales them by their coefficients and
accumulates in float32 registers; positions with coefficient 0 load no row (they read
row 0, which stays in cache, and are discarded by a select). Ids and coefficients arrive
position-major (`[features, bag, batch]`) so each position's ids are one contiguous load.
Pooled output is written straight into the `[batch, features, dim]` layout.

Triton needs every loaded block to have a power-of-two size: `block` and `dim` must be
powers of two (the wrapper checks; pad a stack's dim with `stack_tables(dim=...)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import platform


def _bag_kernel(ids_ref, coef_ref, lengths_ref, table_ref, out_ref, *, pooled):
    # ids_ref, coef_ref: [bag, block]; lengths_ref: [block]; table_ref: [rows, dim].
    # out_ref: [block, dim] (pooled, a [batch, features, dim] block) or [bag, block, dim].
    block = ids_ref.shape[1]
    dim = table_ref.shape[1]

    def gather(l):
        c = coef_ref[l, :]
        used = c != 0
        # Clamped like the TPU flavour: a stray id must not read outside the table.
        safe = jnp.clip(jnp.where(used, ids_ref[l, :], 0), 0, table_ref.shape[0] - 1)
        rows = table_ref[safe].astype(jnp.float32)  # [block, dim]
        return jnp.where(used[:, None], rows * c[:, None], 0.0)

    longest = jnp.max(lengths_ref[...])
    if pooled:
        out_ref[...] = jax.lax.fori_loop(
            0, longest, lambda l, acc: acc + gather(l), jnp.zeros((block, dim), jnp.float32)
        )
    else:

        def store(l, carry):
            out_ref[l] = gather(l)
            return carry

        jax.lax.fori_loop(0, longest, store, 0)

        def clear(l, carry):  # positions past every bag of the block are zero
            out_ref[l] = jnp.zeros((block, dim), jnp.float32)
            return carry

        jax.lax.fori_loop(longest, ids_ref.shape[0], clear, 0)


@functools.partial(jax.jit, static_argnames=("pooled", "bags_per_step", "num_warps", "interpret"))
def bag_call(table, ids, lengths, coef, *, pooled: bool, bags_per_step: int, num_warps: int, interpret: bool):
    """One pallas_call over every feature.

    Args:
      table: [rows, dim]; ids: [features, bag, batch] int32; lengths: [features, batch]
        int32; coef: [features, bag, batch] float32; batch a multiple of `bags_per_step`.
    Returns:
      [batch, features, dim] float32 (pooled) or [features, bag, batch, dim].
    """
    features, width, batch = ids.shape
    dim = table.shape[1]
    block = bags_per_step
    position_major = pl.BlockSpec((None, width, block), lambda f, i: (f, 0, i))
    if pooled:
        out_shape = (batch, features, dim)
        out_spec = pl.BlockSpec((block, None, dim), lambda f, i: (i, f, 0))
    else:
        out_shape = (features, width, batch, dim)
        out_spec = pl.BlockSpec((None, width, block, dim), lambda f, i: (f, 0, i, 0))
    return pl.pallas_call(
        functools.partial(_bag_kernel, pooled=pooled),
        grid=(features, batch // block),
        in_specs=[
            position_major,
            position_major,
            pl.BlockSpec((None, block), lambda f, i: (f, i)),
            pl.BlockSpec(memory_space=pl.ANY),  # gathered row by row, never blocked
        ],
        out_specs=out_spec,
        out_shape=platform.output_struct(out_shape, jnp.float32, ids, coef, lengths, table),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(ids, coef, lengths, table)
