"""One order for all the collectives of a program, carried by data dependencies.

Why. XLA:CPU runs a compiled program as a dataflow graph of thunks on a thread pool that
all simulated devices share (8 threads for 8 devices). It starts a collective once the
previous one has started, not finished, and a collective holds its thread until every
device has joined it. Collectives with no data path between them could thus be in flight
together: all_to_alls under the bucketized route's overflow `lax.cond`
(`mesh.sharded_lookup`) beside the dense gradients' all-reduce. Devices blocked in two
collectives at once took every pool thread while two devices had not yet reached the
first one, so the rendezvous timed out after 40 s and XLA aborted (`recsys-train --mesh
host=2,device=4 --sharding grid`: 5 runs of 5). The fix: each collective's operands
depend on the previous collective's result (`Chain.before`, `Chain.after`), so it starts
only once that one has finished, in one order on every device. At most one thread per
device then waits in a rendezvous.

GPU (NCCL) and TPU (ICI) need the same rule: every device must issue the same
collectives in the same order, and none may skip one. Each device runs the same
compiled SPMD program, and the chain leaves the scheduler one order of collectives (it
still overlaps them with independent compute). Every `lax.cond` that holds collectives
is taken through `cond` here, on a predicate reduced over all devices (identical
everywhere), so no device skips what another runs.

Inside an ordered `jax.shard_map` (`ordered_shard_map`), each function of
`mesh.collectives` threads the chain itself; outside one they raise. A program made of
several shard_maps passes the chain on as an `order` array ([devices] int32, one per
device), so the chain spans the whole train step. `mesh.collectives.hlo.unordered_collectives`
checks the order on a compiled program's HLO.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

_CHAIN: contextvars.ContextVar[Chain | None] = contextvars.ContextVar("collective_chain", default=None)


class Chain:
    """The last collective's result, as an int32 scalar every next collective waits for."""

    def __init__(self, axes: tuple[str, ...], token: jax.Array):
        self.axes = axes
        self.token = token
        # The order array comes in varying over every axis unless the shard_map skips
        # the varying-axes check (then nothing carries such types).
        self.checked = bool(_vma(token))
        # Zero that the compiler cannot see through: `token & zero` stays a real read of
        # the previous result instead of folding to a constant.
        self._zero = lax.optimization_barrier(jnp.zeros((), jnp.int32))

    def before(self, tree):
        """`tree` unchanged in value, made to depend on the previous collective's result."""
        go = (self.token & self._zero) == 0  # always true
        return jax.tree.map(lambda x: _gate(x, go), tree)

    def after(self, tree):
        """Records a collective's result as the one the next collective waits for."""
        leaves = [x for x in jax.tree.leaves(tree) if x.size]
        if leaves:
            self.token = _bits(leaves[0].reshape(-1)[0])
        return tree

    def join(self, tree):
        """Makes the next collective wait for `tree` too, besides the previous one."""
        leaves = [x for x in jax.tree.leaves(tree) if x.size]
        if leaves:
            self.token = self.token | (_bits(leaves[0].reshape(-1)[0]) & self._zero)
        return tree


def depend(tree, on):
    """`tree` unchanged in value, made to depend on `on` (any array, inside a shard_map or
    not): what reads the result runs after `on` is computed. An in-place update of a table
    that a lookup `on` read then needs no copy of the table to read from."""
    zero = lax.optimization_barrier(jnp.zeros((), jnp.int32))
    go = (_bits(jax.tree.leaves(on)[0].reshape(-1)[0]) & zero) == 0  # always true
    return jax.tree.map(lambda x: _gate(x, go), tree)


def _gate(x: jax.Array, go: jax.Array) -> jax.Array:
    missing = tuple(sorted(_vma(go) - _vma(x)))
    if missing:  # the value stays the same; only its type says it may differ per device
        x = lax.pcast(x, missing, to="varying")
    return jnp.where(go, x, jnp.zeros_like(x))


def _vma(x) -> frozenset:
    """The mesh axes over which `x` may differ per device (empty without the check)."""
    aval = jax.typeof(x)
    if hasattr(aval, "manual_axis_type"):
        return frozenset(aval.manual_axis_type.varying)
    return frozenset(getattr(aval, "vma", ()) or ())


def _bits(x: jax.Array) -> jax.Array:
    """A scalar's bits as int32 (its value never matters, only that it was read)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    width = jnp.dtype(x.dtype).itemsize * 8
    as_int = lax.bitcast_convert_type(x, jnp.dtype(f"int{width}")) if x.dtype.kind == "f" else x
    return as_int.astype(jnp.int32)


def current() -> Chain:
    """The chain of the ordered shard_map being traced."""
    chain = _CHAIN.get()
    if chain is None:
        raise RuntimeError(
            "mesh.collectives must run inside mesh.collectives.ordered_shard_map, which gives "
            "the program's collectives one order on every device (mesh/collectives/ordering.py)"
        )
    return chain


@contextlib.contextmanager
def ordered(axes: tuple[str, ...], order: jax.Array) -> Iterator[Chain]:
    """Inside a shard_map body: collectives in this scope follow one another, after the
    collective that produced `order` (this device's [1] int32 of an order array)."""
    chain = Chain(axes, order.reshape(()))
    reset = _CHAIN.set(chain)
    try:
        yield chain
    finally:
        _CHAIN.reset(reset)


def varies(x: jax.Array, axes: tuple[str, ...]) -> bool:
    """Whether `x` may differ between the devices along `axes` (always, where the
    shard_map skips the varying-axes check and types carry no such axes)."""
    chain = current()
    return not chain.checked or bool(_vma(x) & set(axes))


def run(op: Callable, x, *args, sums: bool = False, **kwargs):
    """`op(x, *args)` as the chain's next collective. `sums`: `op` reduces over
    `args[0]`; a value already the same on every device there is summed without any
    communication, so it stays as it is rather than being made per-device."""
    chain = current()
    if sums and chain.checked and not any(_vma(leaf) & set(args[0]) for leaf in jax.tree.leaves(x)):
        return op(x, *args, **kwargs)
    return chain.after(op(chain.before(x), *args, **kwargs))


def precede(tree):
    """`tree` (computed without collectives) as a value the chain's next collective waits
    for. Whatever depends on that collective then runs after `tree` was computed: an
    in-place update of a table a local lookup read needs no copy of the table to read from."""
    return current().join(tree)


def cond(pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands):
    """`lax.cond` whose branches continue the chain: the collectives of the branch taken
    follow those before it, and those after the cond follow them. `pred` must be the same
    on every device (reduced over all of them), so every device takes the same branch."""
    chain = current()
    if chain.checked and _vma(pred):
        raise ValueError(
            f"collectives.cond: the predicate may differ over mesh axes {sorted(_vma(pred))}; reduce it "
            "over all devices first (e.g. collectives.any_device), or some device skips a collective"
        )
    start = chain.token

    def branch(fn):
        def body(*args):
            chain.token = start
            out = fn(*args)
            return out, _as_varying(chain.token, chain.axes)  # one type from both branches

        return body

    out, chain.token = lax.cond(pred, branch(true_fn), branch(false_fn), *operands)
    return out


def ordered_shard_map(body: Callable, *, mesh: jax.sharding.Mesh, in_specs, out_specs, check_vma=True):
    """`jax.shard_map(body)` with the body's collectives in one order, continuing the
    collectives of the program's previous ordered shard_map.

    `in_specs` has one spec per argument of `body`. Returns `mapped(order, *args) ->
    (order, outputs)`: `order` is the previous shard_map's ([devices] int32, sharded over
    all mesh axes) or None for a new chain.
    """
    axes = tuple(mesh.axis_names)

    def ordered_body(order, *args):
        with ordered(axes, order) as chain:
            out = body(*args)
            token = chain.token
        return _as_varying(token, axes)[None], out

    # One spec per argument; a lone PartitionSpec (itself a tuple) is one argument's.
    specs = (in_specs,) if isinstance(in_specs, P) else tuple(in_specs)
    mapped = jax.shard_map(
        ordered_body,
        mesh=mesh,
        in_specs=(P(axes), *specs),
        out_specs=(P(axes), out_specs),
        check_vma=check_vma,
    )

    def call(order, *args):
        if order is None:
            order = jnp.zeros((mesh.devices.size,), jnp.int32)
        return mapped(order, *args)

    return call


def _as_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    missing = tuple(a for a in axes if a not in _vma(x))
    return lax.pcast(x, missing, to="varying") if missing else x
