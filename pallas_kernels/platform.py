"""Which kernel flavour runs where, and whether it is interpreted.

Each kernel comes in two flavours sharing one reference and one test suite:
  "tpu": Mosaic idioms (scalar-prefetched ids, rows copied by manual DMA, double buffering).
  "gpu": Triton lowering (vector gathers of whole row blocks, one program per block).
"auto" picks the flavour of the default backend. On CPU Pallas only interprets, and the
"gpu" flavour is the one interpreted by default because its interpreter is the cheaper
(the TPU interpreter simulates every DMA); tests run both.
"""

from __future__ import annotations

import jax

FLAVOURS = ("auto", "tpu", "gpu")


def resolve(flavour: str, interpret: bool | None) -> tuple[str, bool]:
    """(flavour, interpret) to run with on the default backend.

    Args:
      flavour: "auto", "tpu" or "gpu".
      interpret: None interprets exactly when JAX runs on CPU.
    Raises:
      ValueError: an unknown flavour, or a compiled flavour the backend cannot run.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    if flavour == "auto":
        flavour = "tpu" if backend == "tpu" else "gpu"
    if not interpret and backend != flavour:
        raise ValueError(
            f"the compiled {flavour!r} flavour needs a {flavour.upper()} backend, JAX runs on "
            f"{backend!r}; pass interpret=True to interpret it"
        )
    return flavour, interpret


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def output_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """A `pallas_call` output of `shape` and `dtype` that varies over the mesh axes any of
    `operands` varies over: inside `jax.shard_map` (the sharded train step) outputs must
    say so. Outside it that is no axis."""
    manual = [jax.typeof(x).manual_axis_type for x in operands]
    varying = frozenset().union(*(m.varying for m in manual))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=manual[0].update(varying=varying))
