"""Codecs for compressed collectives: float32 rows -> a narrow payload and back.

Each codec turns float32 values `[..., width]` into a payload that travels as unsigned
integers of the narrow width, so the collective's operand in the compiled HLO really is
narrow. XLA:CPU widens bf16 collective operands to f32; bitcasting to uint16 first keeps
them at two bytes. A per-row scale (and bias) rides in the same payload: its float32 bytes
are appended to each row, so one collective moves everything.

Decode-of-encode error bounds, per element x of a row r (`Codec.error_bound` computes
them, and `tests/test_compression.py` checks them):

  fp32      exact.
  fp16      |e| <= 2^-11 |x| + 2^-25; values beyond +-65504 saturate to +-65504 (use bf16
            for wide ranges; gradients and pooled embeddings stay far inside).
  bf16      |e| <= 2^-8 |x| + 2^-134 (round to nearest even, float32's exponent range).
  fp8_e4m3  scale s = max_r|x| / 448; |e| <= 2^-4 |x| + 2^-10 s + 2^-21 |x|.
  fp8_e5m2  scale s = max_r|x| / 57344; |e| <= 2^-3 |x| + 2^-17 s + 2^-21 |x|.
  int8      bias m = min_r x, scale s = (max_r x - m) / 255, q = round((x - m) / s);
            |e| <= s / 2 + 2^-21 max_r|x|.
The 2^-21 terms cover float32 rounding of the scaling arithmetic.
Non-finite inputs are not supported by the scaled codecs (a NaN or inf poisons its row's
scale); the float codecs pass them through.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CODECS = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8")

_FLOAT = {"fp16": jnp.float16, "bf16": jnp.bfloat16}
_FP8 = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def _as_bytes(x: jax.Array) -> jax.Array:
    """float32 [..., n] -> uint8 [..., 4n] (little-endian bytes of each value)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*x.shape[:-1], 4 * x.shape[-1])


def _from_bytes(b: jax.Array) -> jax.Array:
    """uint8 [..., 4n] -> float32 [..., n]."""
    return jax.lax.bitcast_convert_type(b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Codec:
    """One of `CODECS`: how a float32 payload travels."""

    name: str

    def __post_init__(self):
        if self.name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.name!r}")

    @property
    def compresses(self) -> bool:
        return self.name != "fp32"

    def wire_width(self, width: int) -> int:
        """Bytes one row of `width` values occupies on the wire."""
        if self.name == "fp32":
            return 4 * width
        if self.name in _FLOAT:
            return 2 * width
        return width + (8 if self.name == "int8" else 4)

    def encode(self, x: jax.Array) -> jax.Array:
        """float32 [..., width] -> the wire payload [..., wire] (uint16 for fp16/bf16, uint8
        with the row's scale (and bias) bytes appended for fp8/int8, float32 for fp32)."""
        x = x.astype(jnp.float32)
        if self.name == "fp32":
            return x
        if self.name in _FLOAT:
            narrow = _FLOAT[self.name]
            if self.name == "fp16":
                x = jnp.clip(x, -65504.0, 65504.0)  # saturate rather than overflow to inf
            return jax.lax.bitcast_convert_type(x.astype(narrow), jnp.uint16)
        if self.name in _FP8:
            dtype = _FP8[self.name]
            top = float(jnp.finfo(dtype).max)
            amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
            scale = jnp.where(amax > 0, amax / top, 1.0)
            y = jnp.clip(x / scale, -top, top).astype(dtype)
            return jnp.concatenate([jax.lax.bitcast_convert_type(y, jnp.uint8), _as_bytes(scale)], axis=-1)
        low = jnp.min(x, axis=-1, keepdims=True)
        spread = jnp.max(x, axis=-1, keepdims=True) - low
        scale = jnp.where(spread > 0, spread / 255.0, 1.0)
        q = jnp.clip(jnp.round((x - low) / scale), 0, 255).astype(jnp.uint8)
        return jnp.concatenate([q, _as_bytes(scale), _as_bytes(low)], axis=-1)

    def decode(self, payload: jax.Array) -> jax.Array:
        """The wire payload -> float32 [..., width]."""
        if self.name == "fp32":
            return payload
        if self.name in _FLOAT:
            return jax.lax.bitcast_convert_type(payload, _FLOAT[self.name]).astype(jnp.float32)
        if self.name in _FP8:
            y = jax.lax.bitcast_convert_type(payload[..., :-4], _FP8[self.name]).astype(jnp.float32)
            return y * _from_bytes(payload[..., -4:])
        q = payload[..., :-8].astype(jnp.float32)
        return q * _from_bytes(payload[..., -8:-4]) + _from_bytes(payload[..., -4:])

    def error_bound(self, x: jax.Array) -> jax.Array:
        """The documented bound on |decode(encode(x)) - x|, per element (finite x)."""
        x = x.astype(jnp.float32)
        ax = jnp.abs(x)
        amax = jnp.max(ax, axis=-1, keepdims=True)
        if self.name == "fp32":
            return jnp.zeros_like(x)
        if self.name == "fp16":
            return 2.0**-11 * ax + 2.0**-25 + jnp.maximum(ax - 65504.0, 0.0)
        if self.name == "bf16":
            return 2.0**-8 * ax + 2.0**-134
        if self.name == "fp8_e4m3":
            return 2.0**-4 * ax + 2.0**-10 * amax / 448.0 + 2.0**-21 * ax
        if self.name == "fp8_e5m2":
            return 2.0**-3 * ax + 2.0**-17 * amax / 57344.0 + 2.0**-21 * ax
        spread = jnp.max(x, axis=-1, keepdims=True) - jnp.min(x, axis=-1, keepdims=True)
        return jnp.broadcast_to(spread / 510.0 + 2.0**-21 * amax, x.shape)


def codec(name: str | Codec) -> Codec:
    return name if isinstance(name, Codec) else Codec(name)
