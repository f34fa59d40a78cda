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


def test_a_model_builder_is_created_already_sharded():
    """`ShardedTrainer(build, ...)` draws each device's block of the tables inside one
    jit: the same values as the built module, without a whole table on any device."""
    import optax
    from flax import nnx

    from recsys.models import DLRM
    from recsys.specs import EmbeddingConfig, FeatureSpec
    from recsys.training import ShardedTrainer

    config = EmbeddingConfig(
        tables=(TableSpec(name="big", rows=40_000, dim=16), TableSpec(name="small", rows=30, dim=16)),
        features=(FeatureSpec(name="f", table="big", max_ids=2), FeatureSpec(name="g", table="small")),
    )

    def build():
        return DLRM(config, dense_features=3, bottom=(8, 16), top=(8, 1), rngs=nnx.Rngs(0))

    mesh = make_mesh(8)
    plan = plan_for_strategy(config.tables, mesh_spec(mesh), "row_wise")
    lazy = ShardedTrainer(build, optax.adam(1e-3), plan, mesh)
    eager = ShardedTrainer(build(), optax.adam(1e-3), plan, mesh)
    lazy_state, eager_state = lazy.init_state(), eager.init_state()
    want = eager.logical_tables(eager_state)
    for name, value in lazy.logical_tables(lazy_state).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    for a, b in zip(jax.tree.leaves(lazy_state.params), jax.tree.leaves(eager_state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    memory = lazy.initial_program().lower().compile().memory_analysis()
    table_bytes = 40_000 * 16 * 4
    assert memory.output_size_in_bytes < table_bytes / 4, memory.output_size_in_bytes
    assert memory.temp_size_in_bytes < table_bytes / 2, memory.temp_size_in_bytes
