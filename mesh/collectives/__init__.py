"""Every collective the sharded embedding uses, in one place, with their compression.

The batch is sharded over all mesh axes together, in row-major order of the axes. Inside
`jax.shard_map`, `all_to_all` routes ids and results between batch owners and row
owners (`mesh.routing`); `gather_batch` and `scatter_sum_batch` move per-sample data of
data-parallel tables between "my slice of the batch" and "the whole batch"; `permute`
moves table pieces for checkpoints (`mesh.relayout`); `sum_over` and `any_device` reduce
statistics and flags. `codecs` holds the payload compressions; `all_to_all` and
`compressed_sum` take one. They run only inside `ordered_shard_map`, which gives all of a
program's collectives one order on every device (`ordering` says why).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax import lax

from mesh.collectives.codecs import CODECS as CODECS  # re-exported
from mesh.collectives.codecs import Codec as Codec
from mesh.collectives.codecs import codec
from mesh.collectives.hlo import COLLECTIVE_KINDS, PURPOSE, computations
from mesh.collectives.hlo import unordered_collectives as unordered_collectives  # re-exported
from mesh.collectives.ordering import cond as cond  # re-exported
from mesh.collectives.ordering import ordered_shard_map as ordered_shard_map
from mesh.collectives.ordering import precede as precede
from mesh.collectives.ordering import run as _ordered
from mesh.collectives.ordering import varies
from mesh.collectives.packing import IDS_CODECS as IDS_CODECS  # re-exported


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommConfig:
    """The codec of each compressed collective, per direction (like TorchRec's QComms).

    fwd: pooled embeddings (and looked-up rows) on their way back to the batch owners.
    bwd: their gradients on the way to the row owners.
    allreduce: the dense parameters' gradient all-reduce (summed in float32).
    ids: "int32", or "packed": each id as a row of the receiving owner's block in the
      fewest whole bytes that address it (`packing`; lossless). Ids of a row-wise shard
      outside its rows travel as one "not mine" code.
    Row-wise Adagrad's statistics, pooling coefficients and flags always travel exactly.
    """

    fwd: str = "fp32"
    bwd: str = "fp32"
    allreduce: str = "fp32"
    ids: str = "int32"

    def __post_init__(self):
        for direction in DIRECTIONS:
            name = getattr(self, direction)
            choices = IDS_CODECS if direction == "ids" else CODECS
            if name not in choices:
                raise ValueError(
                    f"--comm {direction}={name!r}: the codec must be one of {', '.join(choices)}"
                )

    @classmethod
    def parse(cls, text: str) -> CommConfig:
        """From "fwd=fp16,bwd=bf16,allreduce=bf16" (directions left out stay fp32)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            direction, sep, name = part.partition("=")
            if not sep or direction not in DIRECTIONS:
                raise ValueError(
                    f"--comm: {part!r} is not DIRECTION=CODEC with DIRECTION one of {', '.join(DIRECTIONS)}"
                )
            if direction in values:
                raise ValueError(f"--comm: {direction} is given twice")
            values[direction] = name
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{d}={getattr(self, d)}" for d in DIRECTIONS)


DIRECTIONS = ("fwd", "bwd", "allreduce", "ids")


def round_trip_bytes(forward: str, backward: str, width: int) -> int:
    """Wire bytes of one `width`-wide result row in codec `forward` plus its gradient row
    in codec `backward`."""
    return Codec(forward).wire_width(width) + Codec(backward).wire_width(width)


def gather_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """[local_batch, ...] on every device -> [global_batch, ...] on every device.

    The result is marked invariant over `axes` (it is the same everywhere), so values
    computed from it alone, like a data-parallel table's update, may leave `shard_map`
    as replicated outputs.
    """
    with tagged("data_parallel"):
        return _ordered(lax.all_gather, x, axes, axis=0, tiled=True, to="invarying")


def all_to_all(
    x: jax.Array, axes: tuple[str, ...], compression: str | Codec = "fp32", purpose: str = "other"
) -> jax.Array:
    """[devices, ...] -> [devices, ...]: entry e goes to device e; entry s of the result
    came from device s (row-major over `axes`, like `device_index`).

    With a compressing codec, float32 rows (the last axis) travel encoded and come back
    decoded to float32: the error is the codec's (`codecs`), the bytes its wire width.
    `purpose` names what travels, for `bytes_by_purpose`.
    """
    c = codec(compression)
    with tagged(purpose):
        if not c.compresses:
            return _ordered(lax.all_to_all, x, axes, 0, 0)
        return c.decode(_ordered(lax.all_to_all, c.encode(x), axes, 0, 0))


def compressed_sum(
    x: jax.Array, axes: tuple[str, ...], compression: str | Codec, row: int = 256
) -> jax.Array:
    """`psum(x)` with the payload compressed both ways and the sum taken in float32.

    The all-reduce becomes a reduce-scatter and an all-gather, both of encoded rows of
    `row` values: each device receives every device's encoded piece of its slice (an
    all_to_all), decodes and adds them in float32 (never in the narrow type), encodes its
    slice's sum and all-gathers it. Each device sends 2 (k-1)/k of the encoded size, like
    a ring all-reduce of the narrow payload. Error: the codec's bound on each of the k
    addends plus its bound on the sum.
    """
    c = codec(compression)
    if not c.compresses:
        with tagged("allreduce"):
            return _ordered(lax.psum, x, axes, sums=True)
    with tagged("allreduce"):
        return _compressed_sum(x, axes, c, row)


def _compressed_sum(x, axes, c: Codec, row: int):
    k = lax.axis_size(axes)
    flat = x.astype(jnp.float32).reshape(-1)
    row = max(1, min(row, -(-flat.size // k)))  # small payloads: pad to k rows, not k x row
    rows = -(-flat.size // (k * row)) * k
    pieces = jnp.pad(flat, (0, rows * row - flat.size)).reshape(k, rows // k, row)
    received = c.decode(_ordered(lax.all_to_all, c.encode(pieces), axes, 0, 0))  # [k, rows/k, row]
    mine = jnp.sum(received, axis=0)
    # Invariant: every device decodes the same gathered payload ([k, rows/k, wire]).
    gathered = _ordered(lax.all_gather, c.encode(mine), axes, axis=0, tiled=False, to="invarying")
    return c.decode(gathered).reshape(-1)[: flat.size].reshape(x.shape).astype(x.dtype)


def scatter_sum_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Sums [global_batch, ...] contributions over devices; each keeps its own batch slice."""
    with tagged("data_parallel"):
        return _ordered(lax.psum_scatter, x, axes, sums=True, scatter_dimension=0, tiled=True)


def sum_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """The sum of `x` over all devices, on every device (row-wise statistics, flags)."""
    with tagged("stats"):
        return _ordered(lax.psum, x, axes, sums=True)


def mean_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """The mean of `x` over all devices, on every device (a replicated model's batch
    statistics); a value already the same on every device is returned as it is."""
    if not varies(x, axes):
        return x
    with tagged("stats"):
        return _ordered(lax.psum, x, axes, sums=True) / lax.axis_size(axes)


def any_device(flag: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """True on every device if `flag` is true on any (bucket overflow)."""
    with tagged("stats"):
        return _ordered(lax.psum, flag.astype(jnp.int32), axes, sums=True) > 0


def permute(x: jax.Array, axes: tuple[str, ...], pairs: list[tuple[int, int]]) -> jax.Array:
    """Sends `x` from each `src` to its `dst` (global device indices); devices that
    receive nothing get zeros (`mesh.relayout`)."""
    return _ordered(lax.ppermute, x, axes, perm=pairs)


def device_index(axes: tuple[str, ...]) -> jax.Array:
    """This device's global index: its row-major position over `axes`."""
    return lax.axis_index(axes)


_DTYPE_BYTES = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "u16": 2,
    "s16": 2,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s64": 8,
    "f64": 8,
}
_LINE = re.compile(r"=\s*(?P<shapes>.+?)\s+(?P<op>[a-z-]+?)(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*|pred)\[([\d,]*)\]")
_GROUP = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_CALLED = re.compile(r"\b(?:calls|body|to_apply)=%(?P<name>[^\s,]+)")
_TRUE_FALSE = re.compile(r"true_computation=%(?P<true>[^\s,]+), false_computation=%(?P<false>[^\s,]+)")


def _sent(line: str, devices: int) -> tuple[str, int] | None:
    match = _LINE.search(line)
    if not match or match["op"] not in COLLECTIVE_KINDS or "-done" in line.split("=")[1].split("(")[0]:
        return None
    size = 0
    for dtype, dims in _SHAPE.findall(match["shapes"]):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        size += count * _DTYPE_BYTES.get(dtype, 4)
    group = _GROUP.search(line)
    k = len(group[1].split(",")) if group else devices
    if k <= 1:
        return None
    op = match["op"]
    sent = {
        "all-gather": size * (k - 1) // k,
        "all-to-all": size * (k - 1) // k,
        "reduce-scatter": size * (k - 1),
        "all-reduce": 2 * size * (k - 1) // k,
        "collective-permute": size,
    }[op]
    return op, sent


def _walk(hlo_text: str, devices: int, branch: int, key) -> dict[str, int]:
    """Bytes sent per execution, summed under `key(op, line)` over every collective."""
    bodies, entry = computations(hlo_text)
    if not entry:  # not a module dump: count every line
        bodies, entry = {"": hlo_text.splitlines()}, ""
    out: dict[str, int] = {}

    def count(name: str) -> None:
        for line in bodies.get(name, ()):
            sent = _sent(line, devices)
            if sent:
                k = key(sent[0], line)
                out[k] = out.get(k, 0) + sent[1]
            if " conditional(" in line:
                names = _BRANCHES.search(line)
                if names:
                    branches = [n.strip().lstrip("%") for n in names["names"].split(",")]
                else:
                    tf = _TRUE_FALSE.search(line)
                    branches = [tf["false"], tf["true"]] if tf else []
                if branches:
                    count(branches[min(branch, len(branches) - 1)])
            else:  # fusions, calls, while bodies (counted once): collectives rarely hide there
                for called in _CALLED.findall(line):
                    count(called)

    count(entry)
    return out


def collective_bytes(hlo_text: str, devices: int, branch: int = 0) -> dict[str, int]:
    """Bytes one device sends per execution of a compiled program, by collective kind.

    Read from the optimized HLO (`jitted.lower(...).compile().as_text()`), counting ring
    algorithms: all-gather and all-to-all send (k-1)/k of their result, reduce-scatter
    sends k-1 result-sized chunks, all-reduce twice (k-1)/k of its size, a permute its
    whole operand; k is the replica-group size.

    A conditional runs one branch: `branch` picks which is counted, 0 being a `lax.cond`'s
    false branch. Every `lax.cond` here has its fallback route as the true branch, so the
    default counts the common path and `branch=1` the fallback (`mesh.bucketed`).
    """
    return {**dict.fromkeys(COLLECTIVE_KINDS, 0), **_walk(hlo_text, devices, branch, lambda op, line: op)}


# What each collective carries, named by the scope it runs under (`tagged`).
PURPOSES = ("fwd", "bwd", "allreduce", "ids", "stats", "data_parallel", "other")


def tagged(purpose: str):
    """A scope naming what the collectives inside carry; `bytes_by_purpose` reads it back
    from the compiled HLO's op names."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    return jax.named_scope(f"comm_{purpose}")


def bytes_by_purpose(hlo_text: str, devices: int, branch: int = 0) -> dict[str, int]:
    """Bytes one device sends per execution, by what they carry (`PURPOSES`): pooled
    embeddings (fwd), their gradients (bwd), the dense gradients (allreduce: XLA's own
    untagged all-reduces count here too), ids and slots (ids), row-wise statistics and
    flags (stats), data-parallel tables' batch gathers, and the rest."""

    def purpose(op: str, line: str) -> str:
        found = PURPOSE.search(line)
        if found and found["purpose"] in PURPOSES:
            return found["purpose"]
        return "allreduce" if op == "all-reduce" else "other"

    return {**dict.fromkeys(PURPOSES, 0), **_walk(hlo_text, devices, branch, purpose)}
