"""Lossless narrow integers for the id exchanges (`--comm ids=packed`).

The ids an owner receives only need to address its own block: a row-wise shard of a
100,000-row table on 8 devices holds 12,500 rows, so a local row (plus one code for
"padding or not mine") fits in 2 bytes instead of 4. `pack` writes integers known to lie
in `[0, bound)` as their `id_bytes(bound)` low bytes (uint8, little-endian, by shifts, so
the result is the same on every backend) and `unpack` restores them exactly. Where the
bound needs all 4 bytes the int32 values travel unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IDS_CODECS = ("int32", "packed")


def id_bytes(bound: int) -> int:
    """Bytes per value of `[0, bound)`: 1, 2, 3 or 4."""
    if bound < 1:
        raise ValueError(f"bound must be >= 1, got {bound}")
    for width in (1, 2, 3):
        if bound <= 1 << (8 * width):
            return width
    return 4


def to_bytes(x: jax.Array, width: int) -> jax.Array:
    """int32 `[..., n]` -> uint8 `[..., n * width]`: each value's `width` low bytes,
    little-endian."""
    x = x.astype(jnp.int32)
    parts = [jax.lax.shift_right_logical(x, 8 * i) & 0xFF for i in range(width)]
    return jnp.stack(parts, axis=-1).astype(jnp.uint8).reshape(*x.shape[:-1], x.shape[-1] * width)


def from_bytes(b: jax.Array, width: int) -> jax.Array:
    """The inverse of `to_bytes`: int32 `[..., n]` (all 4 bytes restore any int32)."""
    parts = b.reshape(*b.shape[:-1], b.shape[-1] // width, width).astype(jnp.int32)
    out = parts[..., 0]
    for i in range(1, width):
        out = out | (parts[..., i] << (8 * i))
    return out


def pack(x: jax.Array, bound: int) -> jax.Array:
    """int32 `[..., n]` with values in `[0, bound)` -> uint8 `[..., n * id_bytes(bound)]`
    (int32 unchanged where that takes 4 bytes)."""
    width = id_bytes(bound)
    return x.astype(jnp.int32) if width == 4 else to_bytes(x, width)


def unpack(p: jax.Array, bound: int) -> jax.Array:
    """The inverse of `pack`: int32 `[..., n]`."""
    width = id_bytes(bound)
    return p if width == 4 else from_bytes(p, width)


def packed_bytes(codec: str, bound: int) -> int:
    """Bytes per value on the wire under an ids codec (`IDS_CODECS`)."""
    return 4 if codec == "int32" else id_bytes(bound)
