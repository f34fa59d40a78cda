"""Counter-based random bits and stochastic rounding to bfloat16 / float16.

The bits of element (row, column) are a hash of (seed, row, column): no RNG state, the
same on every backend and in the reference, so an update is deterministic given the
seed and independent of how rows are split over grid steps. Only int32 arithmetic
(wrapping multiply, xor, logical shift) is used, which Mosaic, Triton and XLA all lower.

Stochastic rounding keeps the sign and rounds the magnitude up to the next representable
value with probability equal to the dropped fraction, so E[round(x)] = x: small updates
to a low-precision table survive on average instead of being rounded away. Optimizer
state needs it as much: Adam's v moves by (1 - beta2) = 0.1% a step, under half of
bfloat16's spacing, so rounding to nearest would freeze it.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np


def _i32(c: int) -> np.int32:
    return np.uint32(c).view(np.int32)


def _mix(x: jax.Array) -> jax.Array:
    # A 32-bit avalanche (xor-shift-multiply); every input bit flips each output bit
    # with probability about 1/2.
    x = x ^ jax.lax.shift_right_logical(x, 16)
    x = x * _i32(0x7FEB352D)
    x = x ^ jax.lax.shift_right_logical(x, 15)
    x = x * _i32(0x846CA68B)
    return x ^ jax.lax.shift_right_logical(x, 16)


def random_bits(seed: jax.Array, rows: jax.Array, columns: jax.Array) -> jax.Array:
    """int32 random bits for every (row, column); arguments broadcast together."""
    h = _mix(rows.astype(jnp.int32) * _i32(0x9E3779B1) + seed.astype(jnp.int32))
    return _mix(h ^ (columns.astype(jnp.int32) * _i32(0x85EBCA77)))


def stochastic_round(x: jax.Array, bits: jax.Array, dtype) -> jax.Array:
    """float32 `x` rounded to `dtype` (bfloat16 or float16) with random `bits` (int32).

    Exact bound: the result is one of the two `dtype` values bracketing x (x itself when
    representable); non-finite values and float16 overflow round to nearest.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return x
    # Mantissa bits float32 has and `dtype` lacks (float16 in its normal range).
    dropped = 16 if dtype == jnp.bfloat16 else 13
    low = (1 << dropped) - 1
    as_int = jax.lax.bitcast_convert_type(x, jnp.int32)
    up = (as_int + (bits & low)) & _i32(~low & 0xFFFFFFFF)
    rounded = jax.lax.bitcast_convert_type(up, jnp.float32)
    if dtype == jnp.float16:
        # Below float16's normal range its spacing is fixed at 2^-24: round x * 2^24 to an
        # integer at random (uniform from 24 of the bits).
        uniform = jax.lax.shift_right_logical(bits, 8).astype(jnp.float32) * 2.0**-24
        subnormal = jnp.floor(x * 2.0**24 + uniform) * 2.0**-24
        rounded = jnp.where(jnp.abs(x) < 2.0**-14, subnormal, rounded)
        rounded = jnp.where(jnp.abs(x) <= 65504.0, rounded, x)
    finite = jnp.abs(x) <= jnp.finfo(jnp.float32).max
    return jnp.where(finite, rounded, x).astype(dtype)


def state_salt(name: str) -> np.int32:
    """Xored into an update's seed for the optimizer state array `name`, so its rounding
    bits are independent of the table's and of the other state arrays'."""
    return np.int32(zlib.crc32(b"state:" + name.encode()) & 0x7FFFFFFF)


def round_state(x: jax.Array, seed: jax.Array, name: str, rows: jax.Array, columns: jax.Array, dtype):
    """float32 optimizer state `x` stored as `dtype`: stochastically rounded from the bits of
    (seed ^ `state_salt(name)`, row, column) (arguments broadcast together); float16
    saturates at its largest finite value, because an accumulator that overflowed to inf
    would freeze its row's updates at zero."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return x
    if dtype == jnp.float16:
        x = jnp.clip(x, -65504.0, 65504.0)
    return stochastic_round(x, random_bits(seed ^ state_salt(name), rows, columns), dtype)
