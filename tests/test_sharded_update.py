"""The sharded sparse update equals the single-device update for every strategy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh import Strategy, make_mesh, mesh_spec, plan_for_strategy
from mesh.collectives import CommConfig
from mesh.routing import RoutingOptions
from mesh.sharded import gather_logical, gather_logical_slots, shard_logical, sharded_layout
from mesh.sharded_lookup import plan_routes, sharded_lookup
from recsys.layout import build_layout
from recsys.lookup import lookup, stack_tables, unstack_tables
from recsys.sharded_update import (
    feature_routes,
    init_sharded_slots,
    owner_update_path,
    routing_inputs,
    sharded_sparse_update,
)
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
from tests.conftest import random_batch

CONFIG = EmbeddingConfig(
    tables=(
        TableSpec(
            name="a",
            rows=37,
            dim=8,
            optimizer=SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.3, weight_decay=0.1),
        ),
        TableSpec(name="b", rows=5, dim=8, optimizer=SparseOptimizerSpec(kind="adam", learning_rate=0.1)),
        TableSpec(
            name="c",
            rows=64,
            dim=4,
            optimizer=SparseOptimizerSpec(kind="adagrad", learning_rate=0.2, weight_decay=0.05),
        ),
        TableSpec(name="d", rows=20, dim=4, optimizer=SparseOptimizerSpec(kind="sgd", learning_rate=0.5)),
    ),
    features=(
        FeatureSpec(name="a_sum", table="a", max_ids=3),
        FeatureSpec(name="a_mean", table="a", max_ids=4, pooling="mean"),
        FeatureSpec(name="b_weighted", table="b", max_ids=2, weighted=True),
        FeatureSpec(name="c_seq", table="c", max_ids=3, pooling="none"),
        FeatureSpec(name="d_sum", table="d", max_ids=2),
    ),
)
MESHES = {"8x1": "device=8", "2x4": "host=2,device=4"}
PACKED = CommConfig(ids="packed")


def _reference(tables, batches, grads):
    """Single-device sparse updates on the stacked layout -> logical tables and slots."""
    stacked = stack_tables(CONFIG, tables)
    slots = init_slots(CONFIG)
    for step, (batch, g) in enumerate(zip(batches, grads)):
        acts = lookup(CONFIG, stacked, batch)
        act_grads = jax.grad(lambda a: sum(jnp.sum(a[f] * g[f]) for f in g))(acts)
        stacked, slots = sparse_update(CONFIG, stacked, slots, batch, act_grads, jnp.int32(step))
    layout = build_layout(CONFIG)
    logical_slot = {}
    for group in layout.table_groups:
        for spec, offset in zip(group.tables, group.row_offsets):
            logical_slot[spec.name] = {
                k: np.asarray(v[offset : offset + spec.rows]) for k, v in slots[group.name].items()
            }
    return {k: np.asarray(v) for k, v in unstack_tables(CONFIG, stacked).items()}, logical_slot


@pytest.fixture(scope="module")
def case():
    """Tables, two batches with activation gradients, and the single-device result (computed once)."""
    rng = np.random.default_rng(0)
    tables = {t.name: rng.normal(size=(t.rows, t.dim)).astype(np.float32) for t in CONFIG.tables}
    batches = [random_batch(CONFIG, 16, seed=s) for s in (1, 2)]
    dims = {f.name: CONFIG.table(f.table).dim for f in CONFIG.features}
    grads = [
        {
            f.name: jnp.asarray(
                rng.normal(
                    size=(16, f.max_ids, dims[f.name]) if f.pooling.value == "none" else (16, dims[f.name])
                ),
                jnp.float32,
            )
            for f in CONFIG.features
        }
        for _ in batches
    ]
    return tables, batches, grads, _reference(tables, batches, grads)


# Every strategy on the two-axis mesh; on the flat one the plain strategies (the hybrids'
# flat-mesh layouts train in test_sharded_training.py's test_the_hybrids_together_on_8x1).
@pytest.mark.parametrize(
    ("strategy", "mesh_name"),
    [(s.value, "2x4") for s in Strategy]
    + [(s, "8x1") for s in ("table_wise", "row_wise", "column_wise", "data_parallel")],
)
def test_two_steps_match_the_single_device_update(case, strategy, mesh_name):
    check_update(case, strategy, mesh_name, RoutingOptions())


# Row-sharded groups every way, each route on two strategies: each id to its row's owners,
# rows back or pooled there (capacity 8x: never full; or so small that every step
# overflows and falls back), and every id to every row shard. The 2x4 grid has column
# blocks: row-wise Adagrad's statistic is completed through the senders on the pooled
# route. Ids travel packed (the int32 forward of the bucketized routes is in
# test_sharded_lookup.py; the table- and column-wise strategies above take the broadcast
# route with int32 ids), except on the overflowing route, whose fallback is the broadcast
# route with int32 ids.
ROUTES = {
    "rows_packed": RoutingOptions("rows", 8.0, comm=PACKED),
    "pooled_packed": RoutingOptions("pooled", 8.0, comm=PACKED),
    "overflowing": RoutingOptions("pooled", 0.05),
    "broadcast_packed": RoutingOptions("broadcast", comm=PACKED),
}


@pytest.mark.parametrize(
    ("strategy", "route"),
    [
        ("row_wise", "rows_packed"),
        ("table_row_wise", "rows_packed"),
        ("grid", "pooled_packed"),
        ("table_row_wise", "pooled_packed"),
        ("grid", "overflowing"),
        ("row_wise", "overflowing"),
        ("grid", "broadcast_packed"),
        ("table_row_wise", "broadcast_packed"),
    ],
)
def test_every_row_wise_route_matches_the_single_device_update(case, strategy, route):
    check_update(case, strategy, "2x4", ROUTES[route])


# Owners' updates through each path: on CPU "auto" (above) takes the CPU kernel for
# row-wise Adagrad's float32 groups and XLA for the other optimizers and for column
# shards (grid, column-wise); "pallas" runs the fused Pallas update interpreted, every
# optimizer.
@pytest.mark.parametrize(("strategy", "kernels"), [("row_wise", "pallas"), ("data_parallel", "pallas")])
def test_owner_update_paths_match_the_single_device_update(case, strategy, kernels):
    mesh = make_mesh(MESHES["8x1"])
    layout = sharded_layout(plan_for_strategy(CONFIG.tables, mesh_spec(mesh), strategy), CONFIG.tables, mesh)
    assert {owner_update_path(CONFIG, layout, g.name, kernels) for g in layout.groups} == {kernels}
    check_update(case, strategy, "8x1", RoutingOptions(), kernels)


def test_owner_update_path_keeps_rowwise_column_shards_on_xla():
    mesh = make_mesh(MESHES["2x4"])
    layout = sharded_layout(plan_for_strategy(CONFIG.tables, mesh_spec(mesh), "grid"), CONFIG.tables, mesh)
    paths = {g.tables[0]: owner_update_path(CONFIG, layout, g.name, "pallas") for g in layout.groups}
    assert paths["a"] == "xla" and paths["b"] == "pallas"  # a: row-wise Adagrad; b: Adam


def check_update(case, strategy, mesh_name, options, kernels="auto"):
    tables, batches, grads, (want_tables, want_slots) = case
    mesh = make_mesh(MESHES[mesh_name])
    layout = sharded_layout(plan_for_strategy(CONFIG.tables, mesh_spec(mesh), strategy), CONFIG.tables, mesh)
    sharded, slots = shard_logical(layout, tables, mesh), init_sharded_slots(CONFIG, layout, mesh)
    routes = plan_routes(layout, feature_routes(CONFIG), batches[0].batch_size // mesh.devices.size, options)

    @jax.jit
    def step_fn(t, s, b, g, i):
        _, routed, order = sharded_lookup(layout, t, routes, *routing_inputs(CONFIG, b), mesh)
        return sharded_sparse_update(CONFIG, layout, mesh, t, s, routes, routed, b, g, i, kernels, order)[:2]

    for step, (batch, g) in enumerate(zip(batches, grads)):
        sharded, slots = step_fn(sharded, slots, batch, g, jnp.int32(step))
    got_tables, got_slots = gather_logical(layout, sharded), gather_logical_slots(layout, slots)
    for name in want_tables:
        np.testing.assert_allclose(got_tables[name], want_tables[name], rtol=1e-5, atol=1e-6, err_msg=name)
        for k in want_slots[name]:
            np.testing.assert_allclose(
                got_slots[name][k], want_slots[name][k], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{k}"
            )
