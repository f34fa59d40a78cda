"""Device-side conversions between a plan's layout and logical tables, piece by piece."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh import Strategy, make_mesh, mesh_spec, plan_for_strategy, relayout
from mesh.relayout import Piece, schedule
from mesh.sharded import gather_logical, logical_sharding, shard_logical, sharded_layout
from recsys.specs import TableSpec

TABLES = (
    TableSpec(name="even", rows=96, dim=8),
    TableSpec(name="prime", rows=97, dim=8),  # no row split: blocks of columns instead
    TableSpec(name="tiny", rows=3, dim=8),  # fewer rows than devices
)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("host=2,device=4")


def check_every_copy(array: jax.Array, expected: np.ndarray):
    """Every device's block of a logical array holds the right cells (copies included)."""
    for shard in array.addressable_shards:
        np.testing.assert_array_equal(
            np.asarray(shard.data), expected[shard.index], err_msg=str(shard.device)
        )


@pytest.mark.parametrize("strategy", list(Strategy))
def test_round_trip_of_tables_and_row_slots(mesh, strategy):
    rng = np.random.default_rng(0)
    tables = {t.name: rng.normal(size=(t.rows, t.dim)).astype(np.float32) for t in TABLES}
    row_slots = {t.name: rng.normal(size=(t.rows,)).astype(np.float32) for t in TABLES}
    layout = sharded_layout(plan_for_strategy(TABLES, mesh_spec(mesh), strategy), TABLES, mesh)
    for values in (tables, row_slots):
        storage = shard_logical(layout, values, mesh)
        for g in layout.groups:
            logical = relayout.to_logical(layout, g.name, storage[g.name], mesh)
            for name, array in logical.items():
                rows, dim = layout.table_shapes[name]
                assert array.sharding.is_equivalent_to(
                    logical_sharding(rows, dim if array.ndim == 2 else None, mesh), array.ndim
                )
                check_every_copy(array, values[name])
            back = relayout.from_logical(layout, g.name, logical, mesh)
            assert back.sharding.is_equivalent_to(storage[g.name].sharding, back.ndim)
            for name, value in gather_logical(layout, {g.name: back}).items():
                np.testing.assert_array_equal(value, values[name], err_msg=name)


@pytest.mark.parametrize("strategy", ["row_wise", "column_wise", "table_row_wise", "grid"])
def test_no_device_holds_a_whole_table_while_converting(mesh, strategy):
    """Compiled memory per device of both conversions, for a table split over several
    devices: the inputs and outputs are that device's blocks, and the temporaries stay
    well below the table's bytes (plain `jit` needed 2-3x the table on every device)."""
    big = (TableSpec(name="big", rows=40_000, dim=16),)
    layout = sharded_layout(plan_for_strategy(big, mesh_spec(mesh), strategy), big, mesh)
    (g,) = layout.groups
    table_bytes = 40_000 * 16 * 4
    logical = jax.ShapeDtypeStruct((40_000, 16), jnp.float32, sharding=logical_sharding(40_000, 16, mesh))
    storage = jax.ShapeDtypeStruct(g.shape(True), jnp.float32, sharding=g.sharding(mesh))
    for program, args in (
        (relayout.place_program(layout, g.name, "big", True, mesh), (storage, logical)),
        (relayout.take_program(layout, g.name, "big", True, mesh), (storage,)),
    ):
        memory = program.lower(*args).compile().memory_analysis()
        assert memory.output_size_in_bytes <= table_bytes / 4, (strategy, memory)
        assert memory.temp_size_in_bytes <= table_bytes / 2, (strategy, memory)


def test_schedule_sends_and_receives_one_equal_piece_per_device_and_round():
    rng = np.random.default_rng(1)
    pieces = [
        Piece(int(s), int(d), (0, 0), (0, 0), (int(rng.integers(1, 3)), 4))
        for s, d in rng.integers(0, 8, size=(60, 2))
    ]
    rounds = schedule(pieces)
    assert sorted(p for r in rounds for p in r) == sorted(pieces)
    for members in rounds:
        assert len({p.src for p in members}) == len(members)
        assert len({p.dst for p in members}) == len(members)
        assert len({p.size for p in members}) == 1
