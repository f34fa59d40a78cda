"""CPU kernels for the embedding lookup and the fused row-wise Adagrad update (XLA FFI).

`embedding_bag.cc` is compiled by `pip install` (see `setup.py`) into a shared library in
this package, loaded here with ctypes and registered with `jax.ffi`. Why C++ and not XLA:
on CPU, XLA runs the backward's scatter-add on one thread, and in a train step that
updates the tables in place it copied every gathered row before summing; the plain jnp
path reached 0.31-0.62x of FBGEMM's lookup + row-wise Adagrad samples/s on the 2-core
development machine. These kernels split the work over the cores, prefetch the next
bag's rows, and apply row-wise Adagrad to each unique row in the same pass that sums its
gradient. The semantics are in the C++ file's header; `tests/test_cpu_kernels.py` checks
them against the XLA path.

If the library is missing (no compiler at install time, another OS), `available()` is
False and callers keep the XLA path; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_LOOKUP = "recsys_pooled_lookup"
_ROWWISE_ADAGRAD = "recsys_rowwise_adagrad"


@functools.cache
def _load() -> str | None:
    """Loads and registers the kernels once; returns why not, or None when they are ready."""
    here = Path(__file__).parent
    libraries = sorted(here.glob("_embedding_bag*.so")) + sorted(here.glob("_embedding_bag*.dylib"))
    if not libraries:
        return f"no compiled kernel library in {here} (reinstall with a C++17 compiler: pip install -e .)"
    try:
        lib = ctypes.cdll.LoadLibrary(str(libraries[0]))
        jax.ffi.register_ffi_target(_LOOKUP, jax.ffi.pycapsule(lib.RecsysPooledLookup), platform="cpu")
        jax.ffi.register_ffi_target(
            _ROWWISE_ADAGRAD, jax.ffi.pycapsule(lib.RecsysRowwiseAdagrad), platform="cpu"
        )
    except (OSError, AttributeError) as e:
        return f"could not load {libraries[0]}: {e}"
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"recsys CPU kernels unavailable: {reason}")


def pooled_lookup(table: jax.Array, ids: jax.Array, coef: jax.Array) -> jax.Array:
    """`[batch, features, dim]` float32: out[b, f] = sum_l coef[f, b, l] * table[ids[f, b, l]].

    Args:
      table: [rows, dim] float32.
      ids: [features, batch, bag] int32 rows of `table` (feature-major, so consecutive
        bags read the same table); positions with coef 0 are not read.
      coef: [features, batch, bag] float32 (0 on padding).
    Differentiable in `table` and `coef` (the backward is the XLA scatter-add: the train
    step never takes it, it updates rows with `rowwise_adagrad` instead).
    """
    _require()
    return _pooled(table, ids.astype(jnp.int32), coef.astype(jnp.float32))


@jax.custom_vjp
def _pooled(table, ids, coef):
    nf, nb, nl = ids.shape
    call = jax.ffi.ffi_call(_LOOKUP, jax.ShapeDtypeStruct((nb, nf, table.shape[1]), jnp.float32))
    return call(table, ids.reshape(nf * nb, nl), coef.reshape(nf * nb, nl), features=np.int64(nf))


def _pooled_fwd(table, ids, coef):
    return _pooled(table, ids, coef), (table, ids, coef)


def _pooled_bwd(residuals, grad):
    table, ids, coef = residuals
    used = coef != 0  # positions the forward did not read get no gradient
    safe = jnp.where(used, ids, 0)
    grad = jnp.moveaxis(grad, 1, 0)  # [features, batch, dim]
    d_table = jnp.zeros_like(table).at[safe].add(coef[..., None] * grad[:, :, None, :])
    d_coef = jnp.where(used, jnp.einsum("fbd,fbld->fbl", grad, table[safe]), 0.0)
    return d_table, np.zeros(ids.shape, jax.dtypes.float0), d_coef


_pooled.defvjp(_pooled_fwd, _pooled_bwd)


def rowwise_adagrad(
    table: jax.Array,
    acc: jax.Array,
    ids: jax.Array,
    coef: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    *,
    learning_rate: float,
    eps: float,
    weight_decay: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Row-wise Adagrad on the rows `ids` touch, in place (the outputs alias `table`, `acc`).

    Args:
      table: [rows, dim] float32; acc: [rows] float32.
      ids: [n] int32 row of each occurrence, -1 to skip it.
      coef: [n] float32 factor of its gradient row; src: [n] int32 its row in `grads`.
      grads: [m, dim] float32 (one row per pooled bag, or per position of a sequence).
    Returns:
      (table, acc) after the update.
    """
    _require()
    call = jax.ffi.ffi_call(
        _ROWWISE_ADAGRAD,
        (jax.ShapeDtypeStruct(table.shape, jnp.float32), jax.ShapeDtypeStruct(acc.shape, jnp.float32)),
        input_output_aliases={0: 0, 1: 1},
    )
    return call(
        table,
        acc,
        ids.astype(jnp.int32),
        coef.astype(jnp.float32),
        src.astype(jnp.int32),
        grads.astype(jnp.float32),
        lr=np.float32(learning_rate),
        eps=np.float32(eps),
        weight_decay=np.float32(weight_decay),
    )
