"""The table-batched embedding bag entry point: checks, flavour dispatch, custom VJP."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import platform
from pallas_kernels.dtypes import STORAGE_DTYPES
from pallas_kernels.embedding_bag import kernel_gpu, kernel_tpu
from pallas_kernels.embedding_bag.reference import embedding_bag_reference

TABLE_DTYPES = tuple(jnp.dtype(d) for d in STORAGE_DTYPES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BagBlockSizes:
    """Tiling of the embedding bag kernels."""

    # Bags pooled by one grid step (TPU) or one program (GPU). TPU: a multiple of 8 (the
    # sublane count of the coefficient block); GPU: a power of two (Triton loads).
    bags_per_step: int = 16
    # TPU: at most this many ids are scalar-prefetched into SMEM per pallas_call; larger
    # batches are split into several calls.
    max_prefetch_ids: int = 1 << 15
    # GPU: warps per program.
    num_warps: int = 4

    def __post_init__(self):
        for name in ("bags_per_step", "max_prefetch_ids", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BagBlockSizes.{name} must be a positive int, got {value!r}")
        if not platform.is_power_of_two(self.bags_per_step) or self.bags_per_step < 8:
            raise ValueError(
                f"BagBlockSizes.bags_per_step must be a power of two >= 8, got {self.bags_per_step}"
            )
        if not platform.is_power_of_two(self.num_warps):
            raise ValueError(f"BagBlockSizes.num_warps must be a power of two, got {self.num_warps}")


def _check(table, ids, coef, lengths, flavour):
    if table.ndim != 2:
        raise ValueError(f"table must be [rows, dim], got shape {table.shape}")
    if jnp.dtype(table.dtype) not in [jnp.dtype(d) for d in TABLE_DTYPES]:
        raise ValueError(f"table dtype must be float32, bfloat16 or float16, got {table.dtype}")
    if ids.ndim != 3:
        raise ValueError(f"ids must be [features, batch, bag], got shape {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"ids must be integers, got {ids.dtype}")
    if coef.shape != ids.shape:
        raise ValueError(f"coef shape {coef.shape} differs from ids shape {ids.shape}")
    if lengths is not None and lengths.shape != ids.shape[:2]:
        raise ValueError(f"lengths must be [features, batch] = {ids.shape[:2]}, got {lengths.shape}")
    if flavour == "gpu" and not platform.is_power_of_two(table.shape[1]):
        raise ValueError(
            f"the GPU flavour needs a power-of-two dim (Triton loads), got {table.shape[1]}: "
            "pad the stack with stack_tables(..., dim=...)"
        )


def bag_lengths(coef: jax.Array) -> jax.Array:
    """[features, batch] int32: one past each bag's last position with a nonzero coef."""
    width = coef.shape[-1]
    used = coef != 0
    last = width - jnp.argmax(used[..., ::-1], axis=-1)
    return jnp.where(jnp.any(used, axis=-1), last, 0).astype(jnp.int32)


def embedding_bag(
    table: jax.Array,
    ids: jax.Array,
    coef: jax.Array,
    lengths: jax.Array | None = None,
    *,
    pooled: bool = True,
    flavour: str = "auto",
    interpret: bool | None = None,
    block_sizes: BagBlockSizes | None = None,
) -> jax.Array:
    """Table-batched embedding bag: every feature of one stacked table in one kernel call.

    Args:
      table: [rows, dim] float32, bfloat16 or float16 (accumulation is float32).
      ids: [features, batch, bag] int32 rows of `table`, which must be in range: the
        batch packer checks them with an error naming the feature and sample. A kernel
        cannot raise, so it clamps a stray id to the table rather than read outside it.
      coef: [features, batch, bag] float32 (see `bag_coefficients`; 0 on padding).
      lengths: [features, batch] valid leading positions of each bag; positions at or past
        it are never read. Default: derived from `coef`.
      pooled: sum each bag, or return every position (sequence features).
      flavour, interpret: see `pallas_kernels.platform.resolve`.
    Returns:
      [batch, features, dim] float32 when pooled, else [batch, features, bag, dim].
    Differentiable in `table` and `coef`; the backward is the reference's (a training step
    updates the table with `pallas_kernels.fused_update` instead).
    """
    flavour, interpret = platform.resolve(flavour, interpret)
    _check(table, ids, coef, lengths, flavour)
    block_sizes = block_sizes or BagBlockSizes()
    ids = ids.astype(jnp.int32)
    coef = coef.astype(jnp.float32)
    # Clipped: a length past the bag would copy rows outside the TPU flavour's buffer.
    lengths = bag_lengths(coef) if lengths is None else jnp.clip(lengths.astype(jnp.int32), 0, ids.shape[2])
    config = (pooled, flavour, interpret, block_sizes)
    return _bag(config, table, ids, coef, lengths)


def _run(config, table, ids, coef, lengths):
    pooled, flavour, interpret, sizes = config
    features, batch, width = ids.shape
    block = sizes.bags_per_step
    if flavour == "gpu":
        pad = -batch % block
        padded = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
        position_major = lambda x: padded(jnp.swapaxes(x, 1, 2))  # [features, bag, batch]
        out = kernel_gpu.bag_call(
            table,
            position_major(ids),
            padded(lengths),
            position_major(coef),
            pooled=pooled,
            bags_per_step=block,
            num_warps=sizes.num_warps,
            interpret=interpret,
        )
        if pooled:
            return out[:batch]
        return jnp.transpose(out, (2, 0, 1, 3))[:batch]  # [batch, features, bag, dim]

    # TPU: bags flattened feature-major, split into calls that fit the SMEM budget.
    bags = features * batch
    per_call = max(block, sizes.max_prefetch_ids // max(width, 1) // block * block)
    total = -(-bags // block) * block
    flat = lambda x: jnp.pad(x.reshape(bags, *x.shape[2:]), [(0, total - bags)] + [(0, 0)] * (x.ndim - 2))
    ids, coef, lengths = flat(ids), flat(coef), flat(lengths)
    parts = [
        kernel_tpu.bag_call(
            table,
            ids[start : start + per_call],
            lengths[start : start + per_call],
            coef[start : start + per_call],
            pooled=pooled,
            bags_per_step=block,
            interpret=interpret,
        )
        for start in range(0, total, per_call)
    ]
    out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    out = out[:bags].reshape(features, batch, *out.shape[1:])
    return jnp.moveaxis(out, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bag(config, table, ids, coef, lengths):
    return _run(config, table, ids, coef, lengths)


def _bag_fwd(config, table, ids, coef, lengths):
    return _run(config, table, ids, coef, lengths), (table, ids, coef, lengths)


def _bag_bwd(config, residuals, grad):
    table, ids, coef, lengths = residuals
    pooled = config[0]
    _, vjp = jax.vjp(lambda t, c: embedding_bag_reference(t, ids, c, pooled=pooled), table, coef)
    d_table, d_coef = vjp(grad)
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    return d_table, zero(ids), d_coef, zero(lengths)


_bag.defvjp(_bag_fwd, _bag_bwd)
