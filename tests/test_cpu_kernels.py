"""The CPU kernels (`recsys.cpu_kernels`) against plain jnp and against the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys import cpu_kernels
from recsys.layout import build_layout
from recsys.lookup import init_tables, lookup
from recsys.sparse_update import update_path
from recsys.specs import SparseOptimizerSpec
from tests.conftest import make_config, random_batch, update_steps

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
    safe = np.where(coef == 0.0, 0, ids)
    want = np.einsum("fbl,fbld->bfd", coef, np.asarray(table)[safe])  # batch-major out
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[3, 1]).any()


def test_pooled_lookup_refuses_ids_out_of_range():
    table = jnp.ones((5, 4), jnp.float32)
    with pytest.raises(Exception, match="id 9 at flat position 1 is outside the table's 5 rows"):
        ids = jnp.asarray([[[0, 9]]], jnp.int32)
        cpu_kernels.pooled_lookup(table, ids, jnp.ones((1, 1, 2))).block_until_ready()


# 40 rows: grouped by a counting sort; 1,000 rows (more than 8x the occurrences): by a sort.
@pytest.mark.parametrize("rows", [40, 1000])
def test_rowwise_adagrad_matches_plain_jnp(rows):
    rng = np.random.default_rng(1)
    dim, n, m = 8, 60, 15
    table = jnp.asarray(rng.normal(size=(rows, dim)), jnp.float32)
    acc = jnp.asarray(rng.random(rows), jnp.float32)
    ids = rng.integers(0, 10, n).astype(np.int32)  # many repeats
    ids[::6] = -1  # skipped occurrences
    coef = rng.normal(size=n).astype(np.float32)
    src = rng.integers(0, m, n).astype(np.int32)
    grads = rng.normal(size=(m, dim)).astype(np.float32)
    lr, eps, wd = 0.1, 1e-8, 0.05
    new_table, new_acc = jax.jit(
        lambda *a: cpu_kernels.rowwise_adagrad(*a, learning_rate=lr, eps=eps, weight_decay=wd)
    )(table, acc, jnp.asarray(ids), jnp.asarray(coef), jnp.asarray(src), jnp.asarray(grads))
    want_table, want_acc = np.asarray(table).copy(), np.asarray(acc).copy()
    for r in sorted(set(ids[ids >= 0])):
        g = sum(coef[i] * grads[src[i]] for i in np.flatnonzero(ids == r)) + wd * want_table[r]
        want_acc[r] += np.mean(g * g)
        want_table[r] -= lr * g / (np.sqrt(want_acc[r]) + eps)
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
