"""The fused backward + optimizer entry point: checks, segments, flavour dispatch."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.fused_update import kernel_gpu, kernel_tpu
from pallas_kernels.fused_update.optimizers import RowOptimizer
from pallas_kernels.fused_update.segments import build_segments


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateBlockSizes:
    """Tiling of the fused update kernels."""

    # TPU: unique rows updated by one grid step (the optimizer runs on [rows, dim]
    # blocks); a multiple of 8, the sublane count.
    rows_per_step: int = 8
    # TPU: occurrences whose gradient rows are in flight together.
    window: int = 16
    # GPU: warps per program (one program per unique row).
    num_warps: int = 1

    def __post_init__(self):
        for name in ("rows_per_step", "window", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UpdateBlockSizes.{name} must be a positive int, got {value!r}")
        if self.rows_per_step % 8:
            raise ValueError(
                f"UpdateBlockSizes.rows_per_step must be a multiple of 8, got {self.rows_per_step}"
            )
        if not platform.is_power_of_two(self.num_warps):
            raise ValueError(f"UpdateBlockSizes.num_warps must be a power of two, got {self.num_warps}")


def _check(table, state, ids, coef, src, grads, optimizer, flavour):
    if table.ndim != 2:
        raise ValueError(f"table must be [rows, dim], got shape {table.shape}")
    rows, dim = table.shape
    floats = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jnp.dtype(table.dtype) not in floats:
        raise ValueError(f"table dtype must be float32, bfloat16 or float16, got {table.dtype}")
    names = optimizer.state_names()
    if set(state) != set(names):
        raise ValueError(f"{optimizer.kind} needs state {list(names)}, got {sorted(state)}")
    for name in names:
        expected = (rows,) if optimizer.kind == "rowwise_adagrad" else (rows, dim)
        if state[name].shape != expected:
            raise ValueError(f"state {name!r} must have shape {expected}, got {state[name].shape}")
        if jnp.dtype(state[name].dtype) not in floats:
            raise ValueError(
                f"state {name!r} dtype must be float32, bfloat16 or float16, got {state[name].dtype}"
            )
    if ids.ndim != 1 or coef.shape != ids.shape or src.shape != ids.shape:
        raise ValueError(f"ids, coef, src must be [n] alike, got {ids.shape}, {coef.shape}, {src.shape}")
    if grads.ndim != 2 or grads.shape[1] != dim:
        raise ValueError(f"grads must be [m, {dim}], got shape {grads.shape}")
    if flavour == "gpu" and not platform.is_power_of_two(dim):
        raise ValueError(f"the GPU flavour needs a power-of-two dim (Triton loads), got {dim}")


def fused_update(
    table: jax.Array,
    state: dict[str, jax.Array],
    ids: jax.Array,
    coef: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    *,
    optimizer: RowOptimizer,
    step: jax.Array | int = 0,
    lr_scale: jax.Array | float = 1.0,
    seed: jax.Array | int = 0,
    stochastic_rounding: bool = True,
    flavour: str = "auto",
    interpret: bool | None = None,
    block_sizes: UpdateBlockSizes | None = None,
    row_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sums each touched row's gradient once and applies the optimizer to it, in place.

    No `[rows, dim]` gradient is formed: the kernel reads each occurrence's gradient row,
    sums a row's occurrences in batch order (so the result is deterministic), and rewrites
    only the touched rows of the table and its state (`input_output_aliases`; donate them
    to update without a copy).

    Args:
      table: [rows, dim] float32, bfloat16 or float16.
      state: the optimizer's arrays (`optimizer.state_names()`): [rows] for row-wise
        Adagrad, else [rows, dim]; float32, bfloat16 or float16 (computed in float32 and
        stored back like the table, `rounding.round_state`).
      ids: [n] int32 row of each occurrence; -1 (or any id outside [0, rows)) skips it.
      coef: [n] float32 factor of its gradient row (pooling coefficient).
      src: [n] int32 row of `grads` it came from.
      grads: [m, dim] activation gradients (one row per pooled bag or sequence position).
      optimizer: the hyperparameters; `step` (updates applied before this one) feeds
        Adam's bias correction.
      lr_scale: this step's factor on `optimizer.learning_rate` (a schedule's), a runtime
        scalar.
      seed: int32; with `stochastic_rounding`, a narrow table and narrow state are
        rounded stochastically from bits hashed from (seed, row, column) (salted per
        state array): deterministic given the seed. Without it they round to nearest.
      flavour, interpret: see `pallas_kernels.platform.resolve`.
      row_keys: [rows] int32, the row each stored row draws its rounding bits as (a
        cache's slots round as the rows they hold); None: itself.
    Returns:
      (table, state) after the update.
    """
    flavour, interpret = platform.resolve(flavour, interpret)
    _check(table, state, ids, coef, src, grads, optimizer, flavour)
    sizes = block_sizes or UpdateBlockSizes()
    rows, dim = table.shape
    names = optimizer.state_names()
    # Row-wise Adagrad's [rows] accumulator is a [rows, 1] column inside the kernels.
    columns = tuple(state[k].reshape(rows, optimizer.state_width(dim)) for k in names)
    # Static flags: which arrays the kernel rounds stochastically.
    rounding = stochastic_rounding and jnp.dtype(table.dtype) != jnp.float32
    state_rounding = stochastic_rounding and any(jnp.dtype(c.dtype) != jnp.float32 for c in columns)
    pad = sizes.window if flavour == "tpu" else 0
    segments = build_segments(ids.astype(jnp.int32), coef, src, rows, pad=pad)
    # The row each unique row's rounding bits are hashed from.
    keys = segments.rows if row_keys is None else row_keys.at[segments.rows].get(mode="fill", fill_value=0)
    seed = jnp.asarray(seed, jnp.int32).reshape(1)
    scalars = optimizer.step_scalars(step, lr_scale)
    common = dict(optimizer=optimizer, rounding=rounding, state_rounding=state_rounding, interpret=interpret)
    if flavour == "tpu":
        call = functools.partial(
            kernel_tpu.update_call, rows_per_step=sizes.rows_per_step, window=sizes.window, **common
        )
    else:
        call = functools.partial(kernel_gpu.update_call, num_warps=sizes.num_warps, **common)
    table, columns = call(table, columns, segments, keys.astype(jnp.int32), grads, seed, scalars)
    return table, {k: v.reshape(state[k].shape) for k, v in zip(names, columns)}
