"""Meshes from specs and sharding plans: placement, JSON, printing and validation."""

import dataclasses
import json

import jax
import pytest

from mesh import (
    MeshSpec,
    Shard,
    ShardingPlan,
    Strategy,
    TablePlan,
    make_mesh,
    plan_for_strategy,
    validate_plan,
)
from mesh.plan import column_split, row_blocks
from recsys.specs import TableSpec

MESH_2X4 = MeshSpec.parse("host=2,device=4")
MESH_8 = MeshSpec.flat(8)
TABLES = (
    TableSpec(name="big", rows=1000, dim=16),
    TableSpec(name="small", rows=10, dim=16),
    TableSpec(name="odd", rows=7, dim=8),
    TableSpec(name="wide", rows=50, dim=12),
)


def test_mesh_spec_and_make_mesh():
    assert MeshSpec.parse("host=2,device=4").shape == (2, 4)
    assert (MESH_2X4.hosts, MESH_2X4.devices_per_host, MESH_8.hosts) == (2, 4, 1)
    assert str(MESH_2X4) == "host=2,device=4"
    mesh = make_mesh("host=2,device=4")
    assert mesh.axis_names == ("host", "device") and mesh.devices.shape == (2, 4)
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())
    assert make_mesh(8).axis_names == ("device",)
    with pytest.raises(ValueError, match="needs 6 devices, 8 are available"):
        make_mesh("host=2,device=3")
    for bad in ("host2", "host=x", "a=2,a=4", "host=0"):
        with pytest.raises(ValueError):
            MeshSpec.parse(bad)


def test_layout_maths_worked_examples():
    assert row_blocks(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks(10, 8) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 10), (10, 10), (10, 10)]
    assert (column_split(16, 8), column_split(12, 8), column_split(7, 4)) == (8, 6, 1)


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("mesh", [MESH_8, MESH_2X4], ids=["8x1", "2x4"])
def test_uniform_plans_are_valid_and_round_trip(strategy, mesh):
    plan = plan_for_strategy(TABLES, mesh, strategy)
    validate_plan(plan, TABLES, mesh)
    again = ShardingPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    text = str(plan)
    assert all(t.name in text for t in TABLES) and strategy.value in text


def test_placements_match_the_worked_examples():
    rw = plan_for_strategy(TABLES, MESH_2X4, "row_wise").tables["small"]
    assert [(s.device, s.rows) for s in rw.shards] == [
        (0, (0, 2)),
        (1, (2, 4)),
        (2, (4, 6)),
        (3, (6, 8)),
        (4, (8, 10)),
    ]
    twrw = plan_for_strategy(TABLES, MESH_2X4, "table_row_wise").tables
    assert [s.device for s in twrw["big"].shards] == [0, 1, 2, 3]  # the biggest table takes host 0
    assert [s.rows for s in twrw["odd"].shards] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    grid = plan_for_strategy(TABLES, MESH_2X4, "grid").tables["small"]
    assert {(s.device // 4, s.cols) for s in grid.shards} == {(0, (0, 8)), (1, (8, 16))}
    cw = plan_for_strategy(TABLES, MESH_8, "column_wise").tables["wide"]
    assert [s.cols for s in cw.shards] == [(2 * k, 2 * k + 2) for k in range(6)]
    dp = plan_for_strategy(TABLES, MESH_2X4, "data_parallel").tables["odd"]
    assert sorted(s.device for s in dp.shards) == list(range(8))


def test_table_wise_balances_bytes():
    tables = [TableSpec(name=f"t{i}", rows=100 * (i + 1), dim=8) for i in range(16)]
    plan = plan_for_strategy(tables, MESH_8, "table_wise")
    load = plan.device_bytes({t.name: 4 for t in tables})
    assert set(load) == set(range(8))
    assert max(load.values()) <= 1.2 * min(load.values())


def _with(plan, name, **changes):
    return ShardingPlan({**plan.tables, name: dataclasses.replace(plan.tables[name], **changes)}, plan.mesh)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: ShardingPlan({**p.tables, "ghost": p.tables["odd"]}), r"unknown tables \['ghost'\]"),
        (
            lambda p: ShardingPlan({k: v for k, v in p.tables.items() if k != "odd"}),
            r"without a plan \['odd'\]",
        ),
        (lambda p: _with(p, "small", shards=(Shard(9, (0, 10), (0, 16)),)), "device 9 is outside"),
        (lambda p: _with(p, "small", shards=(Shard(0, (0, 9), (0, 16)),)), "uncovered"),
        (
            lambda p: _with(p, "small", shards=(Shard(0, (0, 6), (0, 16)), Shard(1, (4, 10), (0, 16)))),
            "overlap",
        ),
        (
            lambda p: _with(
                p,
                "small",
                strategy="row_wise",
                shards=(Shard(0, (0, 5), (0, 16)), Shard(1, (5, 10), (0, 16))),
            ),
            r"row-wise needs row blocks of 2",
        ),
        (
            lambda p: _with(
                p,
                "small",
                strategy="table_row_wise",
                shards=(Shard(3, (0, 5), (0, 16)), Shard(4, (5, 10), (0, 16))),
            ),
            "lives on one host",
        ),
        (
            lambda p: _with(p, "small", strategy="data_parallel", shards=(Shard(0, (0, 10), (0, 16)),)),
            "one full shard on each of the 8 devices",
        ),
        (
            lambda p: _with(
                p,
                "small",
                strategy="column_wise",
                shards=(Shard(0, (0, 10), (0, 4)), Shard(1, (0, 10), (4, 16))),
            ),
            "equal widths",
        ),
    ],
)
def test_validation_names_the_table_and_problem(edit, message):
    plan = plan_for_strategy(TABLES, MESH_2X4, "table_wise")
    with pytest.raises(ValueError, match=message):
        validate_plan(edit(plan), TABLES, MESH_2X4)


def test_plan_for_another_mesh_and_bad_json():
    plan = plan_for_strategy(TABLES, MESH_2X4, "row_wise")
    with pytest.raises(ValueError, match="made for mesh host=2,device=4"):
        validate_plan(plan, TABLES, MESH_8)
    with pytest.raises(ValueError, match="strategy must be one of"):
        ShardingPlan.from_json({"tables": {"a": {"strategy": "diagonal", "shards": []}}})
    with pytest.raises(ValueError, match="table 'a' shard 0"):
        ShardingPlan.from_json({"tables": {"a": {"strategy": "row_wise", "shards": [{"device": 0}]}}})
    assert TablePlan("grid", ()).strategy is Strategy.GRID
