"""Plain-jnp table-batched embedding bag: the truth both kernel flavours are tested against.

Ids are feature-major `[features, batch, bag]` rows of one stacked table (tables of
different row counts stacked by `stack_tables`); each position carries a float32
coefficient that encodes the pooling: 1 for sum, 1/length for mean, the id's weight for
weighted bags, 0 on padding. A position whose coefficient is 0 contributes exactly 0
(its row is not read, so even a non-finite row cannot leak into the output).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def bag_coefficients(
    lengths: jax.Array, bag: int, weights: jax.Array | None = None, mean: bool | Sequence[bool] = False
) -> jax.Array:
    """[features, batch, bag] float32 coefficients of padded bags.

    Args:
      lengths: [features, batch] int, each bag's number of valid leading positions.
      bag: the padded bag width.
      weights: optional [features, batch, bag] per-id weights (weighted pooling).
      mean: mean pooling for every feature, or one flag per feature.
    """
    valid = jnp.arange(bag)[None, None, :] < lengths[..., None]
    coef = valid.astype(jnp.float32)
    if weights is not None:
        coef = coef * weights.astype(jnp.float32)
    mean = np.broadcast_to(np.asarray(mean, bool), (lengths.shape[0],))
    if mean.any():
        divisor = jnp.maximum(lengths, 1).astype(jnp.float32)[..., None]
        coef = jnp.where(jnp.asarray(mean)[:, None, None], coef / divisor, coef)
    return coef


def embedding_bag_reference(
    table: jax.Array, ids: jax.Array, coef: jax.Array, *, pooled: bool = True
) -> jax.Array:
    """Looks up and pools every bag.

    Args:
      table: [rows, dim] float32, bfloat16 or float16.
      ids: [features, batch, bag] int32 rows of `table`.
      coef: [features, batch, bag] float32.
      pooled: sum each bag (True) or keep every position (sequence features).
    Returns:
      [batch, features, dim] float32 when pooled, else [batch, features, bag, dim].
    """
    used = coef != 0
    rows = table[jnp.where(used, ids, 0)].astype(jnp.float32)  # [f, b, l, d]
    scaled = jnp.where(used[..., None], rows * coef[..., None], 0.0)
    out = jnp.sum(scaled, axis=2) if pooled else scaled
    return jnp.moveaxis(out, 0, 1)


def stack_tables(tables: Sequence[jax.Array], dim: int | None = None) -> tuple[jax.Array, np.ndarray]:
    """Stacks tables of different row counts (and dims up to `dim`) into one array.

    Narrower tables are zero-padded on the right to `dim` (default: the widest), so one
    kernel call serves them all; slice a feature's output back to its table's dim.
    Example: tables of 10x4 and 6x8 -> a 16x8 array and row offsets [0, 10].

    Returns:
      stacked: [sum of rows, dim] in the first table's dtype.
      row_offsets: [tables] int64, the first stacked row of each table; add a feature's
        table offset to its local ids.
    """
    if not tables:
        raise ValueError("stack_tables needs at least one table")
    widest = max(t.shape[1] for t in tables)
    dim = widest if dim is None else dim
    if dim < widest:
        raise ValueError(f"dim={dim} is narrower than the widest table ({widest})")
    dtypes = {jnp.dtype(t.dtype) for t in tables}
    if len(dtypes) != 1:
        raise ValueError(f"tables of one stack share a dtype, got {sorted(map(str, dtypes))}")
    padded = [jnp.pad(t, ((0, 0), (0, dim - t.shape[1]))) for t in tables]
    offsets = np.cumsum([0] + [t.shape[0] for t in tables[:-1]])
    return jnp.concatenate(padded), offsets
