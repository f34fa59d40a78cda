"""CPU kernels through the XLA FFI: the pooled embedding lookup, the fused row-wise Adagrad
update, float32 matmul (OpenBLAS's sgemm) and pairwise dot products of vectors.

XLA:CPU runs a scatter-add on one thread, copies gathered rows before an in-place
update, and multiplies small or transposed float32 matrices well below the machine's
rate; these kernels split their loops over the cores and fuse what XLA keeps apart. The
semantics are in the C++ files' headers and in `reference.py`, which the tests compare
them with (`tests/test_cpu_kernels.py`); figures are in docs/kernels.md.

The C++ sources are compiled by `pip install` (`setup.py`): on x86-64 once per
microarchitecture level, and `_library` loads the one for this CPU. If none is there (no
compiler at install time, another OS), `available()` is False and callers keep the XLA
path; `unavailable_reason()` says why. Without scipy-openblas32, `dense_available()` is
False and dense layers stay on XLA.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_LOOKUP = "recsys_pooled_lookup"
_ROWWISE_ADAGRAD = "recsys_rowwise_adagrad"
_MATMUL = "recsys_matmul"
_PAIRWISE_DOTS = "recsys_pairwise_dots"
_PAIRWISE_DOTS_GRAD = "recsys_pairwise_dots_grad"


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """Loads and registers the kernels once: (the library, None), or (None, why not)."""
    path, reason = _library_path(Path(__file__).parent)
    if path is None:
        return None, reason
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in (
            (_LOOKUP, lib.RecsysPooledLookup),
            (_ROWWISE_ADAGRAD, lib.RecsysRowwiseAdagrad),
            (_MATMUL, lib.RecsysMatmul),
            (_PAIRWISE_DOTS, lib.RecsysPairwiseDots),
            (_PAIRWISE_DOTS_GRAD, lib.RecsysPairwiseDotsGrad),
        ):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, AttributeError) as e:
        return None, f"could not load {path}: {e}"
    return lib, None


def _library_path(here: Path) -> tuple[Path | None, str | None]:
    """The library for this CPU: on x86-64 `setup.py` builds one per microarchitecture
    level (`_kernels_x86_64_v2.so` runs on every x86-64 CPU of the last decade), and the
    baseline one says which level this CPU has (`RecsysCpuLevel`); elsewhere one
    `_kernels.so`, built for the baseline of its architecture."""
    levels = {int(p.stem.rsplit("_v", 1)[1]): p for p in here.glob("_kernels_x86_64_v[0-9].so")}
    if levels:
        try:
            cpu = ctypes.cdll.LoadLibrary(str(levels[min(levels)])).RecsysCpuLevel()
        except (OSError, AttributeError) as e:
            return None, f"could not load {levels[min(levels)]}: {e}"
        fitting = [level for level in levels if level <= cpu]
        if not fitting:
            return None, f"this CPU (x86-64 level {cpu}) runs none of the built libraries {sorted(levels)}"
        return levels[max(fitting)], None
    plain = sorted(here.glob("_kernels*.so")) + sorted(here.glob("_kernels*.dylib"))
    if plain:
        return plain[0], None
    return None, f"no compiled kernel library in {here} (reinstall with a C++17 compiler: pip install -e .)"


def library_path() -> Path | None:
    """The kernel library this process runs (None: none could be loaded)."""
    return _library_path(Path(__file__).parent)[0] if available() else None


def _load() -> str | None:
    return _library()[1]


_blas_handles: list[ctypes.CDLL] = []  # OpenBLAS, kept loaded for as long as the process

# After each call OpenBLAS's worker threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles before
# they sleep (2^28, about 0.1 s, by default), while the kernels and XLA fusions after an
# sgemm want the same cores: 2^20 cycles instead (docs/kernels.md). A user's value is kept.
OPENBLAS_THREAD_TIMEOUT = "20"


@contextlib.contextmanager
def environment_default(name: str, value: str):
    """`name`=`value` in the environment inside the block unless it is set already; as
    it was afterwards (OpenBLAS reads its settings once, when it is loaded)."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        del os.environ[name]


@functools.cache
def _load_blas() -> str | None:
    """Hands OpenBLAS's sgemm to the library once; returns why not, or None when ready."""
    lib, reason = _library()
    if lib is None:
        return reason
    try:
        import scipy_openblas32
    except ImportError:
        return "scipy-openblas32 is not installed (pip install scipy-openblas32)"
    try:
        path = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
        with environment_default("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT):
            blas = ctypes.CDLL(str(path))
        # The package prefixes every symbol (cblas.h in its include dir) so that it can sit
        # beside another BLAS in one process.
        sgemm = ctypes.cast(blas.scipy_cblas_sgemm, ctypes.c_void_p)
    except (OSError, AttributeError, IndexError, TypeError) as e:
        return f"could not load OpenBLAS's sgemm from {scipy_openblas32.get_lib_dir()}: {e}"
    lib.RecsysSetSgemm(sgemm)
    _blas_handles.append(blas)
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def dense_available() -> bool:
    """Whether `matmul` and `pairwise_dots` can run (the library and OpenBLAS loaded)."""
    return _load_blas() is None


def dense_unavailable_reason() -> str | None:
    return _load_blas()


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"recsys CPU kernels unavailable: {reason}")


def _require_dense() -> None:
    reason = _load_blas()
    if reason is not None:
        raise RuntimeError(f"recsys CPU dense kernels unavailable: {reason}")


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
    learning_rate: float | jax.Array,
    eps: float,
    weight_decay: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Row-wise Adagrad on the rows `ids` touch, in place (the outputs alias `table`, `acc`).

    Args:
      table: [rows, dim] float32; acc: [rows] float32.
      ids: [n] int32 row of each occurrence, -1 to skip it.
      coef: [n] float32 factor of its gradient row; src: [n] int32 its row in `grads`.
      grads: [m, dim] float32 (one row per pooled bag, or per position of a sequence).
      learning_rate: a float or a float32 scalar array (a schedule's rate of this step).
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
        jnp.asarray(learning_rate, jnp.float32).reshape(1),
        eps=np.float32(eps),
        weight_decay=np.float32(weight_decay),
    )


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) @ op(b) for 2-D float32 arrays, op transposing when asked (OpenBLAS sgemm).
    Not differentiable by itself: `dense_matmul` is."""
    _require_dense()
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a.astype(jnp.float32), b.astype(jnp.float32), trans_a=bool(trans_a), trans_b=bool(trans_b))


@jax.custom_vjp
def dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] in float32, forward and backward through OpenBLAS: the
    backward's g @ w.T and x.T @ g are sgemm's transposed forms, with no copies."""
    return _dense_matmul_fwd(x, w)[0]


def _dense_matmul_fwd(x, w):
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    return matmul(rows, w).reshape(*x.shape[:-1], w.shape[1]), (rows, w)


def _dense_matmul_bwd(residuals, g):
    rows, w = residuals
    leading = g.shape[:-1]
    g = g.reshape(-1, g.shape[-1])
    dx = matmul(g, w, trans_b=True)
    dw = matmul(rows, g, trans_a=True)
    return dx.reshape(*leading, rows.shape[1]), dw


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


@jax.custom_vjp
def pairwise_dots(x: jax.Array, emb: jax.Array) -> jax.Array:
    """DLRM's interaction: with each sample's vectors v = [x, emb[0], ..., emb[F - 1]]
    (x [batch, dim], emb [batch, F, dim], float32), the dot product of every pair i < j,
    [batch, (F + 1) * F / 2] in `np.triu_indices(F + 1, 1)` order. Taking x and emb apart
    saves copying them into one array, both ways."""
    _require_dense()
    b, f, _ = emb.shape
    call = jax.ffi.ffi_call(
        _PAIRWISE_DOTS, jax.ShapeDtypeStruct((b, (f + 1) * f // 2), jnp.float32), vmap_method="sequential"
    )
    return call(x.astype(jnp.float32), emb.astype(jnp.float32))


def _pairwise_dots_fwd(x, emb):
    return pairwise_dots(x, emb), (x, emb)


def _pairwise_dots_bwd(residuals, g):
    x, emb = residuals
    call = jax.ffi.ffi_call(
        _PAIRWISE_DOTS_GRAD,
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(emb.shape, jnp.float32)),
        vmap_method="sequential",
    )
    return call(x.astype(jnp.float32), emb.astype(jnp.float32), g.astype(jnp.float32))


pairwise_dots.defvjp(_pairwise_dots_fwd, _pairwise_dots_bwd)
