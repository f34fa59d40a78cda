"""Occurrences grouped by row: the plan both fused update flavours walk.

A batch's occurrences (id, coefficient, gradient row) are stably sorted by id, so each
unique row's occurrences are one contiguous segment in batch order: a kernel sums a
row's gradient exactly once, in a fixed order, and applies the optimizer to the row once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Segments(NamedTuple):
    rows: jax.Array  # [n] int32 unique rows in increasing order; entries past `count` are 0
    starts: jax.Array  # [n + 1] int32 first sorted occurrence of each unique row (then the end)
    src: jax.Array  # [n + pad] int32 gradient row of each sorted occurrence (pad: 0)
    coef: jax.Array  # [n + pad] float32 coefficient of each sorted occurrence (pad: 0)
    count: jax.Array  # [1] int32 number of unique rows


def build_segments(ids: jax.Array, coef: jax.Array, src: jax.Array, rows: int, pad: int = 0) -> Segments:
    """Groups occurrences by row.

    Args:
      ids: [n] int32 row of each occurrence, -1 to skip it (padding).
      coef: [n] float32 factor of its gradient row; src: [n] int32 its gradient row.
      rows: the table's row count; an id outside [0, rows) is skipped like -1.
      pad: zero entries appended to `src` and `coef` (fixed-size windows may overrun).
    Example: ids [5, 2, 5, -1] -> rows [2, 5, 0, 0], starts [0, 1, 3, 3, 3], count 2.
    """
    n = ids.shape[0]
    key = jnp.where((ids >= 0) & (ids < rows), ids, rows).astype(jnp.int32)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    valid = sorted_key < rows
    first = valid & jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    slot = jnp.cumsum(first, dtype=jnp.int32) - 1
    count = jnp.sum(first, dtype=jnp.int32)
    used = jnp.sum(valid, dtype=jnp.int32)
    position = jnp.arange(n, dtype=jnp.int32)
    unique = jnp.zeros((n,), jnp.int32).at[jnp.where(first, slot, n)].set(sorted_key, mode="drop")
    starts = jnp.full((n + 1,), used, jnp.int32).at[jnp.where(first, slot, n + 1)].set(position, mode="drop")
    padded = lambda x: jnp.pad(x, (0, pad)) if pad else x
    return Segments(
        unique,
        starts,
        padded(src.astype(jnp.int32)[order]),
        padded(jnp.where(valid, coef.astype(jnp.float32)[order], 0.0)),
        count.reshape(1),
    )
