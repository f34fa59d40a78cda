"""Every collective the sharded embedding uses, in one place (compression hooks in here later).

The batch is sharded over all mesh axes together, in row-major order of the axes. Inside
`jax.shard_map`, `all_to_all` routes ids and results between batch owners and row
owners (`mesh.routing`); `gather_batch` and `scatter_sum_batch` move per-sample data of
data-parallel tables between "my slice of the batch" and "the whole batch"; `permute`
moves table pieces for checkpoints (`mesh.relayout`); `sum_over` and `any_device` reduce
statistics and flags.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax import lax


def gather_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """[local_batch, ...] on every device -> [global_batch, ...] on every device.

    The result is marked invariant over `axes` (it is the same everywhere), so values
    computed from it alone, like a data-parallel table's update, may leave `shard_map`
    as replicated outputs.
    """
    return lax.all_gather(x, axes, axis=0, tiled=True, to="invarying")


def all_to_all(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """[devices, ...] -> [devices, ...]: entry e goes to device e; entry s of the result
    came from device s (row-major over `axes`, like `device_index`)."""
    return lax.all_to_all(x, axes, 0, 0)


def scatter_sum_batch(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Sums [global_batch, ...] contributions over devices; each keeps its own batch slice."""
    return lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)


def sum_over(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """The sum of `x` over all devices, on every device (row-wise statistics, flags)."""
    return lax.psum(x, axes)


def any_device(flag: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """True on every device if `flag` is true on any (bucket overflow)."""
    return lax.psum(flag.astype(jnp.int32), axes) > 0


def permute(x: jax.Array, axes: tuple[str, ...], pairs: list[tuple[int, int]]) -> jax.Array:
    """Sends `x` from each `src` to its `dst` (global device indices); devices that
    receive nothing get zeros (`mesh.relayout`)."""
    return lax.ppermute(x, axes, perm=pairs)


def device_index(axes: tuple[str, ...]) -> jax.Array:
    """This device's global index: its row-major position over `axes`."""
    return lax.axis_index(axes)


_DTYPE_BYTES = {
    "f32": 4,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "s8": 1,
    "u8": 1,
    "pred": 1,
    "s64": 8,
    "f64": 8,
}
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_LINE = re.compile(r"=\s*(?P<shapes>.+?)\s+(?P<op>[a-z-]+?)(?:-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*|pred)\[([\d,]*)\]")
_GROUP = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_HEADER = re.compile(r"^(ENTRY )?%(?P<name>[^\s(]+) \(")
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_CALLED = re.compile(r"\b(?:calls|body|to_apply)=%(?P<name>[^\s,]+)")
_TRUE_FALSE = re.compile(r"true_computation=%(?P<true>[^\s,]+), false_computation=%(?P<false>[^\s,]+)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header["name"]
            bodies[current] = []
            entry = current if header[1] else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def _sent(line: str, devices: int) -> tuple[str, int] | None:
    match = _LINE.search(line)
    if not match or match["op"] not in _KINDS or "-done" in line.split("=")[1].split("(")[0]:
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
    bodies, entry = _computations(hlo_text)
    if not entry:  # not a module dump: count every line
        bodies, entry = {"": hlo_text.splitlines()}, ""

    def count(name: str, out: dict[str, int]) -> None:
        for line in bodies.get(name, ()):
            sent = _sent(line, devices)
            if sent:
                out[sent[0]] += sent[1]
            if " conditional(" in line:
                names = _BRANCHES.search(line)
                if names:
                    branches = [n.strip().lstrip("%") for n in names["names"].split(",")]
                else:
                    tf = _TRUE_FALSE.search(line)
                    branches = [tf["false"], tf["true"]] if tf else []
                if branches:
                    count(branches[min(branch, len(branches) - 1)], out)
            else:  # fusions, calls, while bodies (counted once): collectives rarely hide there
                for called in _CALLED.findall(line):
                    count(called, out)

    out = dict.fromkeys(_KINDS, 0)
    count(entry, out)
    return out
