"""A self-check of the Pallas kernels before `kernels="auto"` trusts them on a backend.

On GPU and TPU "auto" takes the Pallas lookup and fused update. Before it does, for each
table dtype and width (and each sparse optimizer) a run uses, the kernel is compiled on
a tiny input and compared with its jnp reference. A kernel that fails to compile, fails
to run or disagrees is replaced by the XLA path, with one warning line that says why.

Results are kept per backend for the life of the process (`results()` lists them; the
CLI writes them to its metrics). A check first asked for while a step is traced runs
beside the trace (compiled and run on NumPy inputs, never staged into the step).
Trainers check their tables when built (`recsys.kernels.verify`): with several processes
a kernel is taken only if it passed on every process (`agree`), so that all of them
compile the same program.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.embedding_bag import embedding_bag
from pallas_kernels.embedding_bag.reference import embedding_bag_reference
from pallas_kernels.fused_update import fused_update
from pallas_kernels.fused_update.reference import fused_update_reference
from recsys.specs import SparseOptimizerSpec

_log = logging.getLogger(__name__)

ROWS, BATCH, BAG = 64, 8, 3
# Float32 accumulation in another order than the reference's; narrow tables add their
# rounding (the update's stochastic rounding draws the reference's bits).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}

# (backend, kernel, dtype, width, optimizer) -> (passed, why it failed or "").
_RESULTS: dict[tuple, tuple[bool, str]] = {}


def backend() -> str:
    """The platform kernels are chosen for (JAX's default backend)."""
    return jax.default_backend()


def lookup_ok(dtype, width: int) -> bool:
    """Whether the Pallas embedding bag matches its reference for `dtype` x `width` here."""
    return _checked(("lookup", jnp.dtype(dtype).name, width, None), lambda: _check_lookup(dtype, width))


def update_ok(dtype, width: int, spec: SparseOptimizerSpec) -> bool:
    """Whether the Pallas fused update matches its reference under `spec`."""
    key = ("update", jnp.dtype(dtype).name, width, _optimizer_key(spec))
    return _checked(key, lambda: _check_update(dtype, width, spec))


def agree() -> None:
    """With several processes, fails every check that failed on any of them (each process
    must have run the same checks, as trainers built alike do)."""
    if jax.process_count() == 1 or not _RESULTS:
        return
    from jax.experimental import multihost_utils

    keys = sorted(_RESULTS, key=repr)
    passed = np.asarray([_RESULTS[k][0] for k in keys], np.int32)
    everywhere = np.asarray(multihost_utils.process_allgather(passed)).min(axis=0)
    for key, ok in zip(keys, everywhere):
        if not ok and _RESULTS[key][0]:
            _RESULTS[key] = (False, "failed on another process")


def results() -> list[dict]:
    """Every check run in this process: backend, kernel, dtype, width, optimizer, passed, reason."""
    names = ("backend", "kernel", "dtype", "width", "optimizer")
    return [{**dict(zip(names, key)), "passed": ok, "reason": why} for key, (ok, why) in _RESULTS.items()]


def _checked(key: tuple, check) -> bool:
    key = (backend(), *key)
    if key not in _RESULTS:
        try:
            problem = check()
        except Exception as e:  # any failure to lower, compile or run: the kernel is not used
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _RESULTS[key] = (problem is None, problem or "")
        if problem is not None:
            what = f"the Pallas {key[1]} for {key[2]} tables {key[3]} wide"
            optimizer = f" ({key[4][0]})" if key[4] else ""
            _log.warning(
                "recsys: %s%s failed its self-check on %s, using XLA: %s", what, optimizer, key[0], problem
            )
    return _RESULTS[key][0]


def _optimizer_key(spec: SparseOptimizerSpec) -> tuple:
    """The optimizer settings a compiled update depends on (not its learning rate: a
    runtime scalar)."""
    return (spec.kind.value, spec.state_dtype, spec.eps, spec.weight_decay, spec.beta1, spec.beta2)


def _mismatch(got, want, dtype, what: str) -> str | None:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tol = TOLERANCE[jnp.dtype(dtype).name]
    if got.shape != want.shape:
        return f"{what}: shape {got.shape}, the reference's {want.shape}"
    if not np.all(np.isfinite(got)) or not np.allclose(got, want, rtol=tol, atol=tol):
        return f"{what}: differs from the reference by up to {np.nanmax(np.abs(got - want)):.3g}"
    return None


def _run(fn, *args):
    """`fn(*args)` compiled and run now, on NumPy inputs: called while a step is traced,
    it runs beside the trace instead of being staged into it."""
    return jax.tree.map(np.asarray, jax.jit(fn).lower(*args).compile()(*args))


def _inputs(dtype, width: int):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(ROWS, width)).astype(jnp.dtype(dtype))
    lengths = rng.integers(0, BAG + 1, (2, BATCH)).astype(np.int32)
    ids = rng.integers(0, ROWS, (2, BATCH, BAG)).astype(np.int32)
    valid = np.arange(BAG)[None, None, :] < lengths[..., None]
    coef = np.where(valid, rng.random((2, BATCH, BAG)), 0).astype(np.float32)
    return rng, table, ids, lengths, coef


def _check_lookup(dtype, width: int) -> str | None:
    _, table, ids, lengths, coef = _inputs(dtype, width)
    for pooled in (True, False):
        got = _run(
            lambda t, i, c, n, p=pooled: embedding_bag(t, i, c, n, pooled=p), table, ids, coef, lengths
        )
        want = _run(lambda t, i, c, p=pooled: embedding_bag_reference(t, i, c, pooled=p), table, ids, coef)
        problem = _mismatch(got, want, dtype, "lookup")
        if problem:
            return problem
    return None


def _check_update(dtype, width: int, spec: SparseOptimizerSpec) -> str | None:
    from recsys.sparse_update import kernel_row_optimizer  # it routes through recsys.kernels

    rng, table, ids, _, coef = _inputs(dtype, width)
    optimizer = kernel_row_optimizer(spec)
    shape = (ROWS,) if optimizer.state_width(width) == 1 else (ROWS, width)
    state = {name: rng.random(shape).astype(jnp.dtype(spec.state_dtype)) for name in optimizer.state_names()}
    n = ids.size
    src = rng.integers(0, BATCH, n).astype(np.int32)
    grads = rng.normal(size=(BATCH, width)).astype(np.float32)
    args = (table, state, ids.reshape(n), coef.reshape(n), src, grads)
    options = dict(optimizer=optimizer, step=3, lr_scale=0.5, seed=7)
    got_table, got_state = _run(lambda *a: fused_update(*a, **options), *args)
    want_table, want_state = _run(lambda *a: fused_update_reference(*a, **options), *args)
    problem = _mismatch(got_table, want_table, dtype, "updated table")
    for name in state:
        problem = problem or _mismatch(got_state[name], want_state[name], spec.state_dtype, f"state {name!r}")
    return problem
