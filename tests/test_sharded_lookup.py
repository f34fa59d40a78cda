"""The sharded forward lookup equals the single-device reference for every strategy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh import Shard, ShardingPlan, Strategy, TablePlan, make_mesh, mesh_spec, plan_for_strategy
from mesh.routing import RoutingOptions
from mesh.sharded import gather_logical, shard_logical, sharded_layout
from mesh.sharded_lookup import plan_routes, sharded_lookup
from recsys.lookup import owner_bags, reference_lookup
from recsys.sharded_update import feature_routes, routing_inputs
from recsys.specs import EmbeddingConfig, FeatureSpec, TableSpec
from tests.conftest import random_batch

CONFIG = EmbeddingConfig(
    tables=(
        TableSpec(name="a", rows=37, dim=8),
        TableSpec(name="b", rows=5, dim=8),  # fewer rows than devices
        TableSpec(name="c", rows=64, dim=4),
    ),
    features=(
        FeatureSpec(name="a_sum", table="a", max_ids=3),
        FeatureSpec(name="a_mean", table="a", max_ids=4, pooling="mean"),
        FeatureSpec(name="b_weighted", table="b", max_ids=2, weighted=True),
        FeatureSpec(name="c_seq", table="c", max_ids=3, pooling="none"),
    ),
)
MESHES = {"8x1": "device=8", "2x4": "host=2,device=4"}


def row_coded_tables():
    """Entry (r, c) of table k is k * 10000 + r * 10 + c: a misplaced row or column shows."""
    return {
        t.name: (k * 10000 + np.arange(t.rows)[:, None] * 10 + np.arange(t.dim)[None, :]).astype(np.float32)
        for k, t in enumerate(CONFIG.tables)
    }


def run_sharded(plan, mesh, tables, batch, options=None, routed=False, bags=None):
    layout = sharded_layout(plan, CONFIG.tables, mesh)
    sharded = shard_logical(layout, tables, mesh)
    for name, value in gather_logical(layout, sharded).items():
        np.testing.assert_array_equal(value, tables[name])
    routes = plan_routes(
        layout, feature_routes(CONFIG), batch.batch_size // mesh.devices.size, options or RoutingOptions()
    )
    ids, coef = routing_inputs(CONFIG, batch)
    bags = bags(layout) if bags else None
    lookup = jax.jit(lambda s, i, c: sharded_lookup(layout, s, routes, i, c, mesh, bags))
    acts, received, _ = lookup(sharded, ids, coef)
    return (acts, received) if routed else acts


# Every strategy on the two-axis mesh; on the flat one the plain strategies (the hybrids'
# flat-mesh layouts train in test_sharded_training.py's test_the_hybrids_together_on_8x1).
@pytest.mark.parametrize(
    ("strategy", "mesh_name"),
    [(s.value, "2x4") for s in Strategy]
    + [(s, "8x1") for s in ("table_wise", "row_wise", "column_wise", "data_parallel")],
)
def test_every_strategy_matches_the_reference(strategy, mesh_name):
    mesh = make_mesh(MESHES[mesh_name])
    tables = row_coded_tables()
    batch = random_batch(CONFIG, 16, seed=3)
    expected = reference_lookup(CONFIG, {k: jnp.asarray(v) for k, v in tables.items()}, batch)
    plan = plan_for_strategy(CONFIG.tables, mesh_spec(mesh), strategy)
    got = run_sharded(plan, mesh, tables, batch)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(value), rtol=1e-6, err_msg=name)


def test_mixed_plan_with_several_shards_per_device():
    mesh = make_mesh("host=2,device=4")
    spec = mesh_spec(mesh)
    plan = ShardingPlan(
        {
            "a": plan_for_strategy(CONFIG.tables, spec, "grid").tables["a"],
            "b": plan_for_strategy(CONFIG.tables, spec, "data_parallel").tables["b"],
            # Two column shards of c on the same device 6, rows on 3 and 6.
            "c": TablePlan(
                "column_wise",
                (Shard(6, (0, 64), (0, 2)), Shard(6, (0, 64), (2, 4))),
            ),
        },
        spec,
    )
    tables = row_coded_tables()
    batch = random_batch(CONFIG, 16, seed=5)
    expected = reference_lookup(CONFIG, {k: jnp.asarray(v) for k, v in tables.items()}, batch)
    got = run_sharded(plan, mesh, tables, batch)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(value), rtol=1e-6, err_msg=name)


def skewed_batch(seed: int):
    """Every id of every feature in the first rows of its table: under row-wise sharding
    they all belong to device 0, far more than its share."""
    batch = random_batch(CONFIG, 16, seed=seed)
    features = {name: dataclasses.replace(f, ids=f.ids % 2) for name, f in batch.features.items()}
    return dataclasses.replace(batch, features=features)


@pytest.mark.parametrize(
    ("strategy", "route", "mesh_name"),
    [
        ("row_wise", "rows", "device=8"),
        ("table_row_wise", "rows", "device=8"),
        ("grid", "rows", "device=8"),
        ("row_wise", "pooled", "device=8"),
        ("grid", "pooled", "host=2,device=4"),  # column blocks
    ],
)
@pytest.mark.parametrize(
    ("batch_of", "factor", "overflows"),
    [(lambda: random_batch(CONFIG, 16, seed=3), 8.0, False), (lambda: skewed_batch(4), 2.0, True)],
    ids=["uniform", "skewed"],
)
def test_bucketized_routing_matches_and_falls_back_on_overflow(
    strategy, route, mesh_name, batch_of, factor, overflows
):
    mesh = make_mesh(mesh_name)
    tables, batch = row_coded_tables(), batch_of()
    expected = reference_lookup(CONFIG, {k: jnp.asarray(v) for k, v in tables.items()}, batch)
    plan = plan_for_strategy(CONFIG.tables, mesh_spec(mesh), strategy)
    got, received = run_sharded(plan, mesh, tables, batch, RoutingOptions(route, factor), routed=True)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(value), rtol=1e-6, err_msg=name)
    flags = {
        name: bool(np.asarray(r.fallback).all()) for name, r in received.items() if r.fallback is not None
    }
    assert flags and all(f == overflows for f in flags.values()), flags


def mixed_plan(mesh):
    """a on a row x column grid, b data-parallel, c (the sequence feature) column-wise."""
    spec = mesh_spec(mesh)
    return ShardingPlan(
        {
            "a": plan_for_strategy(CONFIG.tables, spec, "grid").tables["a"],
            "b": plan_for_strategy(CONFIG.tables, spec, "data_parallel").tables["b"],
            "c": plan_for_strategy(CONFIG.tables, spec, "column_wise").tables["c"],
        },
        spec,
    )


@pytest.mark.parametrize("kernels", ["cpu", "pallas"])
@pytest.mark.parametrize(
    ("plan_of", "route", "batch_of", "calls"),
    [
        # Broadcast route (pooled work items and c's sequence positions in one bag call per
        # group) and the data-parallel replica of b (a pooled feature).
        (mixed_plan, "broadcast", lambda: random_batch(CONFIG, 16, seed=3), {True}),
        # Rows route: owners gather served rows (sequence bags); the overflow fallback
        # (the broadcast route) pools.
        (
            lambda m: plan_for_strategy(CONFIG.tables, mesh_spec(m), "row_wise"),
            "rows",
            lambda: skewed_batch(4),
            {True, False},
        ),
        # Pooled route: served rows gathered at the owner, then pooled into work items.
        (
            lambda m: plan_for_strategy(CONFIG.tables, mesh_spec(m), "row_wise"),
            "pooled",
            lambda: random_batch(CONFIG, 16, seed=3),
            {True, False},
        ),
        # Every table replicated: one bag call per group and pooling mode, bags padded.
        (
            lambda m: plan_for_strategy(CONFIG.tables, mesh_spec(m), "data_parallel"),
            "auto",
            lambda: random_batch(CONFIG, 16, seed=3),
            {True, False},
        ),
    ],
    ids=["broadcast", "rows-overflow", "pooled", "data-parallel"],
)
def test_owners_look_up_through_the_embedding_bag_kernels(kernels, plan_of, route, batch_of, calls):
    """`owner_bags`: the Pallas embedding bag (interpreted on CPU) or the CPU kernel at the
    owners gives the reference's activations on every route."""
    mesh = make_mesh("host=2,device=4")
    tables, batch = row_coded_tables(), batch_of()
    expected = reference_lookup(CONFIG, {k: jnp.asarray(v) for k, v in tables.items()}, batch)
    seen = set()

    def spied(layout):
        def spy(fn):
            def bag(block, ids, coef, pooled):
                seen.add(pooled)
                return fn(block, ids, coef, pooled)

            return bag

        bags = owner_bags(CONFIG, layout, kernels)
        assert set(bags) == {g.name for g in layout.groups}  # every group float32
        return {name: spy(fn) for name, fn in bags.items()}

    plan = plan_of(mesh)
    got = run_sharded(plan, mesh, tables, batch, RoutingOptions(route, 2.0), bags=spied)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(value), rtol=1e-6, err_msg=name)
    assert seen == calls


def test_routing_options_are_checked():
    with pytest.raises(ValueError, match="auto, broadcast, rows, pooled"):
        RoutingOptions("sometimes")
    with pytest.raises(ValueError, match="positive"):
        RoutingOptions(capacity_factor=0)


def test_bytes_of_the_fallback_branch_are_counted_apart():
    """A bucketized route compiles to `conditional`s: `branch=1` counts the step that
    overflowed and took the broadcast route. It sends what the broadcast route sends, and
    its buckets' ids, which travel on every step."""
    from mesh.collectives import bytes_by_purpose

    mesh = make_mesh("device=8")
    plan = plan_for_strategy(CONFIG.tables, mesh_spec(mesh), "row_wise")
    layout = sharded_layout(plan, CONFIG.tables, mesh)
    sharded = shard_logical(layout, row_coded_tables(), mesh)
    features, (ids, coef) = feature_routes(CONFIG), routing_inputs(CONFIG, random_batch(CONFIG, 16, seed=3))

    def compiled(route):
        routes = plan_routes(layout, features, 16 // 8, RoutingOptions(route, 2.0))
        step = jax.jit(lambda s, i, c: sharded_lookup(layout, s, routes, i, c, mesh)[0])
        return step.lower(sharded, ids, coef).compile().as_text()

    pooled, broadcast = compiled("pooled"), compiled("broadcast")
    common, fallback = bytes_by_purpose(pooled, 8), bytes_by_purpose(pooled, 8, branch=1)
    # The overflowing step's ids: the broadcast route's, and the buckets on top.
    assert fallback["ids"] > bytes_by_purpose(broadcast, 8)["ids"] > common["ids"] > 0
    assert fallback["fwd"] == bytes_by_purpose(broadcast, 8)["fwd"] > 0
