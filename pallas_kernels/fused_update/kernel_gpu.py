"""GPU (Triton) flavour of the fused backward + optimizer: one program per unique row.

Program k owns the k-th unique row of the sorted segments. It sums the row's gradient
over its occurrences in batch order (scalar loads of each occurrence's gradient row and
coefficient, one `[1, dim]` vector load of the gradient), reads the row and its optimizer
state, applies the optimizer in float32 registers and writes the row back in place (the
table and state are aliased to the outputs). Programs past the unique count return at
once. No two programs touch the same row, so no atomics are needed, and the sum order is
fixed, so the update is deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import platform
from pallas_kernels.fused_update.optimizers import RowOptimizer
from pallas_kernels.fused_update.rounding import random_bits, round_state, stochastic_round


def _update_kernel(
    count_ref,
    seed_ref,
    scalars_ref,
    rows_ref,
    keys_ref,
    starts_ref,
    src_ref,
    coef_ref,
    grads_ref,
    *refs,
    optimizer,
    rounding,
    state_rounding,
):
    # count_ref, seed_ref: [1] int32; scalars_ref: [3] float32 (Adam's bias corrections, the rate).
    # rows_ref, keys_ref: [n] int32 unique rows and the rows their rounding bits are keyed
    # by; starts_ref: [n + 1]; src_ref, coef_ref: [n] sorted occurrences.
    # grads_ref: [m, dim] float32; then the table and state inputs, then their aliased outputs.
    n_state = len(optimizer.state_names())
    table_in, state_in = refs[0], refs[1 : 1 + n_state]
    table_out, state_out = refs[1 + n_state], refs[2 + n_state :]
    k = pl.program_id(0)
    dim = table_in.shape[1]

    @pl.when(k < count_ref[0])
    def _():
        row = rows_ref[k]

        def add(o, acc):
            return acc + coef_ref[o] * grads_ref[pl.ds(src_ref[o], 1), :].astype(jnp.float32)

        grad = jax.lax.fori_loop(starts_ref[k], starts_ref[k + 1], add, jnp.zeros((1, dim), jnp.float32))
        values = table_in[pl.ds(row, 1), :].astype(jnp.float32)
        state = tuple(s[pl.ds(row, 1), :].astype(jnp.float32) for s in state_in)
        values, state = optimizer.apply(values, grad, state, (scalars_ref[0], scalars_ref[1], scalars_ref[2]))
        if rounding:
            columns = jax.lax.broadcasted_iota(jnp.int32, (1, dim), 1)
            bits = random_bits(seed_ref[0], keys_ref[k], columns)
            table_out[pl.ds(row, 1), :] = stochastic_round(values, bits, table_out.dtype)
        else:
            table_out[pl.ds(row, 1), :] = values.astype(table_out.dtype)
        for name, ref, value in zip(optimizer.state_names(), state_out, state):
            if state_rounding:
                columns = jax.lax.broadcasted_iota(jnp.int32, value.shape, 1)
                value = round_state(value, seed_ref[0], name, keys_ref[k], columns, ref.dtype)
            ref[pl.ds(row, 1), :] = value.astype(ref.dtype)


@functools.partial(
    jax.jit, static_argnames=("optimizer", "rounding", "state_rounding", "num_warps", "interpret")
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
    num_warps,
    interpret,
):
    """One pallas_call; `state` is a tuple of [rows, width] arrays. Returns (table, state)."""
    n = segments.rows.shape[0]
    whole = pl.BlockSpec(memory_space=pl.ANY)  # every operand is indexed by row, never blocked
    operands = (
        segments.count,
        seed,
        scalars,
        segments.rows,
        keys,
        segments.starts,
        segments.src,
        segments.coef,
    )
    operands += (grads, table) + tuple(state)
    first_aliased = len(operands) - 1 - len(state)
    out_shape = tuple(platform.output_struct(x.shape, x.dtype, *operands) for x in (table, *state))
    out = pl.pallas_call(
        functools.partial(
            _update_kernel, optimizer=optimizer, rounding=rounding, state_rounding=state_rounding
        ),
        grid=(n,),
        in_specs=[whole] * len(operands),
        out_specs=[whole] * len(out_shape),
        out_shape=out_shape,
        input_output_aliases={first_aliased + i: i for i in range(len(out_shape))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps),
        interpret=interpret,
    )(*operands)
    return out[0], tuple(out[1:])
