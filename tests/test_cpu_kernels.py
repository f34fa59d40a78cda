"""The CPU kernels (`recsys.cpu_kernels`) against plain jnp and against the XLA path."""

import ctypes
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels import cpu as cpu_kernels
from pallas_kernels.cpu.reference import (
    matmul_reference,
    pairwise_dots_reference,
    pooled_lookup_reference,
    rowwise_adagrad_reference,
)
from recsys import kernels as kernel_paths
from recsys.kernels import dense_path
from recsys.layout import build_layout
from recsys.lookup import init_tables, lookup
from recsys.sparse_update import update_path
from recsys.specs import SparseOptimizerSpec
from recsys.training import Trainer
from tests.conftest import make_config, random_batch, update_steps
from tests.test_sharded_training import batches as dlrm_batches
from tests.test_sharded_training import model as dlrm_model

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(), reason=f"CPU kernels not built: {cpu_kernels.unavailable_reason()}"
)


@pytest.mark.parametrize(("rows", "dim", "bag"), [(50, 16, 5), (7, 3, 1), (300, 128, 20)])
def test_pooled_lookup_matches_jnp(rows, dim, bag):
    rng = np.random.default_rng(rows)
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    features, batch = 3, 11
    ids = rng.integers(0, rows, (features, batch, bag)).astype(np.int32)
    ids[..., -1] = ids[..., 0]  # repeated ids in a bag
    coef = rng.normal(size=ids.shape).astype(np.float32)
    coef[rng.random(ids.shape) < 0.3] = 0.0  # padding
    coef[1, 3] = 0.0  # an empty bag
    ids[coef == 0.0] = 10**6  # padding ids are never read, even out of range
    got = jax.jit(cpu_kernels.pooled_lookup)(table, jnp.asarray(ids), jnp.asarray(coef))
    want = pooled_lookup_reference(table, jnp.asarray(ids), jnp.asarray(coef))  # batch-major out
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[3, 1]).any()


def test_pooled_lookup_refuses_ids_out_of_range():
    table = jnp.ones((5, 4), jnp.float32)
    with pytest.raises(Exception, match="id 9 at flat position 1 is outside the table's 5 rows"):
        ids = jnp.asarray([[[0, 9]]], jnp.int32)
        cpu_kernels.pooled_lookup(table, ids, jnp.ones((1, 1, 2))).block_until_ready()


# 40 rows: grouped by a counting sort in one bucket of rows; 5,000 rows (more than 32x the
# occurrences): by a sort; 140,000 rows and 20,000 occurrences: a counting sort over three
# buckets of 2^16 rows, from occurrences counted in two chunks, ids on the buckets' edges.
# Dims below, past and at multiples of the 16 lanes of the sum of squares.
@pytest.mark.parametrize(
    ("rows", "n", "dim"), [(40, 60, 8), (5000, 60, 8), (140_000, 20_000, 8), (5000, 60, 36), (40, 60, 128)]
)
def test_rowwise_adagrad_matches_plain_jnp(rows, n, dim):
    rng = np.random.default_rng(1)
    m = 15
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    acc = jnp.asarray(rng.random(rows), jnp.float32)
    ids = rng.integers(0, min(rows, 10 + n), n).astype(np.int32)  # many repeats
    if rows > 131072:  # the buckets' edges, repeated (position 6 is skipped below)
        ids[[1, 2, 3, 4, 5, 7, 8, 9]] = [65535, 65536, 0, rows - 1, 65535, 131071, 131072, 65536]
    ids[::6] = -1  # skipped occurrences
    coef = rng.normal(size=n).astype(np.float32)
    src = rng.integers(0, m, n).astype(np.int32)
    grads = rng.normal(size=(m, dim)).astype(np.float32)
    lr, eps, wd = 0.1, 1e-8, 0.05
    new_table, new_acc = jax.jit(
        lambda *a: cpu_kernels.rowwise_adagrad(*a, learning_rate=lr, eps=eps, weight_decay=wd)
    )(table, acc, jnp.asarray(ids), jnp.asarray(coef), jnp.asarray(src), jnp.asarray(grads))
    want_table, want_acc = rowwise_adagrad_reference(
        table, acc, jnp.asarray(ids), jnp.asarray(coef), jnp.asarray(src), jnp.asarray(grads),
        learning_rate=lr, eps=eps, weight_decay=wd,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(new_table), want_table, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_acc), want_acc, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(rows), ids)
    np.testing.assert_array_equal(np.asarray(new_table)[untouched], np.asarray(table)[untouched])


def test_sparse_update_is_the_same_through_the_kernel_and_through_xla():
    """Two steps of row-wise Adagrad (weight decay, mean, weighted and sequence features,
    padding, a shared table) either way."""
    config = make_config(SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.2, weight_decay=0.01))
    assert all(update_path(g, "cpu") == "cpu" for g in build_layout(config).table_groups)
    results = {kernels: update_steps(config, kernels) for kernels in ("xla", "cpu")}
    for name in results["xla"][0]:
        np.testing.assert_allclose(results["cpu"][0][name], results["xla"][0][name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            results["cpu"][1][name]["acc"], results["xla"][1][name]["acc"], rtol=1e-5, atol=1e-6
        )


def test_only_float32_row_wise_adagrad_groups_take_the_kernel():
    adam = make_config(SparseOptimizerSpec(kind="adam"))
    assert not any(update_path(g, "cpu") == "cpu" for g in build_layout(adam).table_groups)
    rowwise = make_config(SparseOptimizerSpec(kind="rowwise_adagrad"))
    assert not any(update_path(g, "xla") == "cpu" for g in build_layout(rowwise).table_groups)
    with pytest.raises(ValueError, match="kernels must be one of auto, xla, cpu"):
        update_path(build_layout(rowwise).table_groups[0], "fast")


def test_pooled_lookup_differentiates_like_jnp():
    rng = np.random.default_rng(2)
    table = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 20, (2, 9, 4)), jnp.int32)
    coef = jnp.asarray(rng.normal(size=(2, 9, 4)) * (rng.random((2, 9, 4)) > 0.25), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(9, 2, 6)), jnp.float32)

    def via(fn):
        return jax.grad(lambda t, c: jnp.sum(fn(t, ids, c) * weights), argnums=(0, 1))(table, coef)

    got = via(cpu_kernels.pooled_lookup)
    want = via(lambda t, i, c: jnp.einsum("fbl,fbld->bfd", c, t[i]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], np.where(coef != 0, want[1], 0.0), rtol=1e-5, atol=1e-6)


def test_lookup_is_the_same_through_the_kernel_and_through_xla():
    config = make_config()
    tables = init_tables(config, jax.random.key(3))
    batch = random_batch(config, 16, seed=4)
    via_kernel = lookup(config, tables, batch, kernels="cpu")
    via_xla = lookup(config, tables, batch, kernels="xla")
    for name in via_xla.features():
        np.testing.assert_array_equal(via_kernel[name], via_xla[name], err_msg=name)


dense = pytest.mark.skipif(
    not cpu_kernels.dense_available(),
    reason=f"CPU dense kernels unavailable: {cpu_kernels.dense_unavailable_reason()}",
)


@dense
@pytest.mark.parametrize(("m", "k", "n"), [(37, 19, 23), (1, 5, 1), (64, 0, 3), (130, 129, 17)])
def test_matmul_matches_numpy_in_every_transposition(m, k, n):
    rng = np.random.default_rng(m + k)
    a = rng.normal(size=(m, k)).astype(np.float32)
    b = rng.normal(size=(k, n)).astype(np.float32)
    for trans_a in (False, True):
        for trans_b in (False, True):
            operands = (a.T if trans_a else a, b.T if trans_b else b)
            got = jax.jit(cpu_kernels.matmul, static_argnames=("trans_a", "trans_b"))(
                *operands, trans_a=trans_a, trans_b=trans_b
            )
            want = matmul_reference(*map(jnp.asarray, operands), trans_a=trans_a, trans_b=trans_b)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{trans_a=} {trans_b=}")


@dense
def test_matmul_rejects_mismatched_operands():
    with pytest.raises(Exception, match="contracting sizes differ: 3 and 4"):
        cpu_kernels.matmul(jnp.ones((2, 3)), jnp.ones((4, 5))).block_until_ready()


@dense
def test_dense_matmul_differentiates_like_jnp():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 9, 33)), jnp.float32)  # leading axes are flattened
    w = jnp.asarray(rng.normal(size=(33, 18)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(4, 9, 18)), jnp.float32)

    def grads(fn):
        return jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * weights), argnums=(0, 1))(x, w)

    got, want = jax.jit(lambda: grads(cpu_kernels.dense_matmul))(), grads(lambda x, w: x @ w)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


@dense
def test_dense_matmul_of_an_empty_contraction_is_zero():
    """K = 0 under leading axes: zeros forward, empty gradients back (reshaping by -1
    could not infer the rows of an empty array)."""
    x, w = jnp.ones((3, 4, 0), jnp.float32), jnp.ones((0, 5), jnp.float32)
    y, vjp = jax.vjp(cpu_kernels.dense_matmul, x, w)
    np.testing.assert_array_equal(y, np.zeros((3, 4, 5), np.float32))
    assert [g.shape for g in vjp(jnp.ones((3, 4, 5), jnp.float32))] == [(3, 4, 0), (0, 5)]


@dense
@pytest.mark.parametrize(
    ("batch", "features", "dim"), [(5, 26, 128), (3, 1, 16), (4, 3, 130), (2, 5, 7), (2, 4, 75), (3, 6, 20)]
)
def test_pairwise_dots_and_their_gradient_match_jnp(batch, features, dim):
    """Dims below, at and past the vector steps (16 lanes with AVX-512, 8 with AVX2, and
    64 columns per register block); one feature (one pair)."""
    rng = np.random.default_rng(dim)
    x = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(batch, features, dim)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(batch, (features + 1) * features // 2)), jnp.float32)

    got, got_vjp = jax.vjp(cpu_kernels.pairwise_dots, x, emb)
    want, want_vjp = jax.vjp(pairwise_dots_reference, x, emb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_openblas_thread_timeout_is_a_default_for_loading_only(monkeypatch):
    """OpenBLAS gets the short spin unless the user chose one, and the environment is left
    as it was (other libraries loaded later read it too)."""
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    with cpu_kernels.environment_default("OPENBLAS_THREAD_TIMEOUT", cpu_kernels.OPENBLAS_THREAD_TIMEOUT):
        assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "20"
    assert "OPENBLAS_THREAD_TIMEOUT" not in os.environ
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "28")
    with cpu_kernels.environment_default("OPENBLAS_THREAD_TIMEOUT", cpu_kernels.OPENBLAS_THREAD_TIMEOUT):
        assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "28"
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "28"


def test_the_library_is_built_for_the_highest_level_this_cpu_has():
    """No library is compiled for the building machine: on x86-64 one per level, and the
    loader takes the highest this CPU runs."""
    path = cpu_kernels.library_path()
    if not path.name.startswith("_kernels_x86_64_v"):
        pytest.skip(f"{path.name}: one library for this architecture")
    built = sorted(int(p.stem[-1]) for p in path.parent.glob("_kernels_x86_64_v[0-9].so"))
    cpu = ctypes.cdll.LoadLibrary(str(path)).RecsysCpuLevel()
    assert int(path.stem[-1]) == max(level for level in built if level <= cpu)


def test_dense_path_resolution():
    assert dense_path("xla") == dense_path("pallas") == "xla"
    assert dense_path("auto") == ("cpu" if cpu_kernels.dense_available() else "xla")
    with pytest.raises(ValueError, match="kernels must be one of auto, xla, cpu, pallas"):
        dense_path("fast")


@dense
def test_dlrm_steps_are_the_same_with_the_cpu_dense_kernels_and_with_xla(monkeypatch):
    """Three DLRM train steps (MLPs, interaction, dense optimizer) and a prediction either
    way; the kernel step's program calls the kernels, the XLA step's does not."""
    batches = list(itertools.islice(dlrm_batches(), 3))
    small = Trainer(dlrm_model(), optax.adam(0.01), kernels="cpu")
    assert "recsys_matmul" not in small.train_step.lower(small.init_state(), batches[0]).as_text()
    monkeypatch.setattr(kernel_paths, "DENSE_KERNEL_MIN_MACS", 0)  # this model's layers are all small
    runs = {}
    for kernels in ("cpu", "xla"):
        trainer = Trainer(dlrm_model(), optax.adam(0.01), kernels=kernels)
        state, losses = trainer.init_state(), []
        hlo = trainer.train_step.lower(state, batches[0]).as_text()
        assert ("recsys_matmul" in hlo and "recsys_pairwise_dots" in hlo) == (kernels == "cpu"), kernels
        for batch in batches:
            state, loss = trainer.train_step(state, batch)
            losses.append(float(loss))
        predicted = trainer.predict(state, batches[0].dense, batches[0].sparse)
        runs[kernels] = losses, nnx.to_pure_dict(state.params), predicted
    np.testing.assert_allclose(runs["cpu"][0], runs["xla"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["cpu"][1]), jax.tree.leaves(runs["xla"][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs["cpu"][2], runs["xla"][2], rtol=1e-5, atol=1e-6)
