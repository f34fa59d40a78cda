"""The train step's kernel choice: Pallas, the CPU kernels and XLA give the same result.

On CPU "pallas" runs the kernels interpreted, so this checks the dispatch and the data
plumbing (stacked ids, coefficients, occurrences) exactly as a GPU or TPU run uses them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recsys.layout import build_layout
from recsys.lookup import init_tables, lookup, table_path
from recsys.sparse_update import update_path
from recsys.specs import SparseOptimizerSpec
from tests.conftest import make_config, random_batch, update_steps


def test_lookup_is_the_same_through_pallas_and_xla():
    config = make_config()
    tables = init_tables(config, jax.random.key(3))
    batch = random_batch(config, 16, seed=4)
    via_pallas = lookup(config, tables, batch, kernels="pallas")
    via_xla = lookup(config, tables, batch, kernels="xla")
    for name in via_xla.features():  # sum, mean, weighted and sequence features
        np.testing.assert_allclose(via_pallas[name], via_xla[name], rtol=1e-6, atol=1e-6, err_msg=name)


# Row-wise Adagrad ([rows] state) and Adam ([rows, dim] state, the step count): the
# plumbing differs by state shape only; every kind is checked against the reference in
# tests/test_pallas_kernels.py.
@pytest.mark.parametrize("kind", ["rowwise_adagrad", "adam"])
def test_sparse_update_is_the_same_through_pallas_and_xla(kind):
    """Two steps with weight decay; mean, weighted and sequence features; a shared table."""
    config = make_config(SparseOptimizerSpec(kind=kind, learning_rate=0.2, weight_decay=0.01))
    assert all(update_path(g, "pallas") == "pallas" for g in build_layout(config).table_groups)
    got_tables, got_slots = update_steps(config, "pallas")
    want_tables, want_slots = update_steps(config, "xla")
    for name in want_tables:
        np.testing.assert_allclose(got_tables[name], want_tables[name], rtol=1e-5, atol=1e-6)
        for slot in want_slots[name]:
            np.testing.assert_allclose(got_slots[name][slot], want_slots[name][slot], rtol=1e-5, atol=1e-6)


def test_bfloat16_tables_and_state_round_the_same_bits_through_pallas_and_xla():
    """bfloat16 tables and optimizer state round stochastically on both paths from the same
    (seed, row, column) bits, so they agree up to a value whose float32 update differs at a
    rounding boundary."""
    spec = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.05, state_dtype="bfloat16")
    base = make_config(spec)
    config = dataclasses.replace(
        base, tables=tuple(dataclasses.replace(t, dtype="bfloat16") for t in base.tables)
    )
    got, got_slots = update_steps(config, "pallas", steps=1)
    want, want_slots = update_steps(config, "xla", steps=1)
    initial = init_tables(config, jax.random.key(0))
    for name in want:
        pairs = [(got[name], want[name])] + [
            (got_slots[name][k], want_slots[name][k]) for k in want_slots[name]
        ]
        for x, y in pairs:
            assert x.dtype == y.dtype == jnp.bfloat16
            a, b = np.asarray(x, np.float32), np.asarray(y, np.float32)
            np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-30)  # bfloat16 keeps 8 bits
            assert (a == b).mean() > 0.99
        assert (np.asarray(got[name], np.float32) != np.asarray(initial[name], np.float32)).any()


def _kernels_pass_their_self_checks(monkeypatch):
    """The self-checks (tests/test_kernel_check.py) would compile for the patched backend."""
    from recsys import kernel_check

    monkeypatch.setattr(kernel_check, "lookup_ok", lambda *a: True)
    monkeypatch.setattr(kernel_check, "update_ok", lambda *a: True)


def test_auto_picks_pallas_on_gpu_and_tpu(monkeypatch):
    _kernels_pass_their_self_checks(monkeypatch)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert table_path(jnp.float32, 16, "auto") in ("cpu", "xla")  # "cpu" when the library is built
    assert table_path(jnp.bfloat16, 16, "auto") == "xla"
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert table_path(jnp.float32, 16, "auto") == "pallas"
        assert table_path(jnp.float32, 16, "xla") == "xla"
    # Triton needs power-of-two dims: other dims stay on XLA on GPU.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert table_path(jnp.float32, 24, "auto") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert table_path(jnp.float32, 24, "auto") == "pallas"
    with pytest.raises(ValueError, match="kernels must be one of auto, xla, cpu, pallas"):
        table_path(jnp.float32, 16, "triton")


def test_owner_bags_follow_the_table_path(monkeypatch):
    """Which groups of a sharded layout look up through a kernel at their owners: by
    `table_path` on the group's dtype and shard width (columns per shard)."""
    from mesh import make_mesh, mesh_spec, plan_for_strategy
    from mesh.sharded import sharded_layout
    from pallas_kernels import cpu as cpu_kernels
    from recsys.lookup import owner_bags

    _kernels_pass_their_self_checks(monkeypatch)
    base = make_config()
    a, b, c = base.tables
    tables = (a, dataclasses.replace(b, dim=12), dataclasses.replace(c, dtype="bfloat16"))
    config = dataclasses.replace(base, tables=tables)
    mesh = make_mesh("device=8")
    layout = sharded_layout(plan_for_strategy(tables, mesh_spec(mesh), "table_wise"), tables, mesh)
    width = {g.name: g.width for g in layout.groups}
    bf16 = {g.name for g in layout.groups if "c" in g.tables}
    assert owner_bags(config, layout, "xla") == {}
    assert set(owner_bags(config, layout, "pallas")) == set(width)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    on_cpu = set(width) - bf16 if cpu_kernels.available() else set()
    assert set(owner_bags(config, layout, "auto")) == on_cpu
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Triton: power-of-two widths
    assert set(owner_bags(config, layout, "auto")) == {n for n, w in width.items() if w & (w - 1) == 0}
    assert {w for w in width.values() if w & (w - 1)}, width  # the case is exercised
