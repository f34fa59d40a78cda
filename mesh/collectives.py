"""Every collective the sharded embedding uses, in one place (compression hooks in here later).

The batch is sharded over all mesh axes together, in row-major order of the axes; these
helpers move per-sample data between "my slice of the batch" and "the whole batch"
inside `jax.shard_map`.
"""

from __future__ import annotations

import jax
from jax import lax


def gather_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """[local_batch, ...] on every device -> [global_batch, ...] on every device.

    The result is marked invariant over `axes` (it is the same everywhere), so values
    computed from it alone, like a data-parallel table's update, may leave `shard_map`
    as replicated outputs.
    """
    return lax.all_gather(x, axes, axis=0, tiled=True, to="invarying")


def scatter_sum_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Sums [global_batch, ...] contributions over devices; each keeps its own batch slice."""
    return lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)


def device_index(axes: tuple[str, ...]) -> jax.Array:
    """This device's global index: its row-major position over `axes`."""
    return lax.axis_index(axes)
