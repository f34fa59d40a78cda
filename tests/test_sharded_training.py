"""20 DLRM training steps with sharded tables equal 20 steps on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mesh import Shard, ShardingPlan, Strategy, TablePlan, make_mesh, mesh_spec, plan_for_strategy
from recsys.batching import Batch
from recsys.models import DLRM
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
from recsys.training import ShardedTrainer, Trainer
from recsys.training.pipeline import train_steps
from tests.conftest import random_batch

OPT = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.1, weight_decay=1e-3)
CONFIG = EmbeddingConfig(
    tables=(
        TableSpec(name="t0", rows=50, dim=8, optimizer=OPT),
        TableSpec(
            name="t1", rows=13, dim=8, optimizer=SparseOptimizerSpec(kind="adagrad", learning_rate=0.1)
        ),
        TableSpec(name="t2", rows=200, dim=8, optimizer=OPT),
    ),
    features=(
        FeatureSpec(name="f0", table="t0", max_ids=3, pooling="mean"),
        FeatureSpec(name="f1", table="t1", max_ids=1),
        FeatureSpec(name="f2", table="t2", max_ids=4, pooling="mean"),
        FeatureSpec(name="f3", table="t0", max_ids=2),
    ),
)
STEPS, BATCH = 20, 32


def model():
    return DLRM(CONFIG, dense_features=5, bottom=(16, 8), top=(16, 1), rngs=nnx.Rngs(0))


def batches():
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        yield Batch(
            dense=jnp.asarray(rng.normal(size=(BATCH, 5)), jnp.float32),
            sparse=random_batch(CONFIG, BATCH, seed=100 + step),
            labels=jnp.asarray(rng.random(BATCH) < 0.4, jnp.float32),
        )


@pytest.fixture(scope="module")
def single_device():
    trainer = Trainer(model(), optax.adam(0.01))
    state, losses = trainer.init_state(), []
    for batch in batches():
        state, loss = trainer.train_step(state, batch)
        losses.append(float(loss))
    tables = {k: np.asarray(v) for k, v in trainer.model(state).embedding.logical_tables().items()}
    return losses, tables, nnx.to_pure_dict(state.params)


def mixed_plan(spec, t0: str, t1_device: int, t2: str) -> ShardingPlan:
    """t0 and t2 by the named strategies, t1 table-wise on one device."""
    return ShardingPlan(
        {
            "t0": plan_for_strategy(CONFIG.tables, spec, t0).tables["t0"],
            "t1": TablePlan("table_wise", (Shard(t1_device, (0, 13), (0, 8)),)),
            "t2": plan_for_strategy(CONFIG.tables, spec, t2).tables["t2"],
        },
        spec,
    )


def run_sharded(plan, mesh):
    trainer = ShardedTrainer(model(), optax.adam(0.01), plan, mesh)
    state, losses = trainer.init_state(), []
    for batch in batches():
        state, loss = trainer.train_step(state, trainer.shard_batch(batch))
        losses.append(float(loss))
    return losses, trainer.logical_tables(state), nnx.to_pure_dict(state.params)


def check(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, err_msg="losses")
    for name in want[1]:
        np.testing.assert_allclose(got[1][name], want[1][name], rtol=1e-4, atol=1e-5, err_msg=name)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[2]), jax.tree.leaves(want[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=str(path))


# Every strategy on 2x4, three tables to a plan so that seven strategies take three
# compiles (each table's failure names it). On 8x1: the flat ones in one mixed plan
# (`test_mixed_plan_on_8x1`), the three hybrids together in another
# (`test_the_hybrids_together_on_8x1`); row_wise alone runs on 8 devices in
# tests/test_train_cli.py. t1 is the 13-row Adagrad table, so row_wise splits it unevenly.
_PLANS_2X4 = [
    ("row_wise", "table_wise", "column_wise"),
    ("grid", "data_parallel", "table_row_wise"),
    ("table_column_wise", "row_wise", "data_parallel"),
]
assert {s for plan in _PLANS_2X4 for s in plan} == {s.value for s in Strategy}


@pytest.mark.slow
@pytest.mark.parametrize("strategies", _PLANS_2X4, ids="-".join)
def test_every_strategy_trains_like_one_device(single_device, strategies):
    mesh = make_mesh("host=2,device=4")
    spec = mesh_spec(mesh)
    plan = ShardingPlan(
        {
            name: plan_for_strategy(CONFIG.tables, spec, strategy).tables[name]
            for name, strategy in zip(("t0", "t1", "t2"), strategies, strict=True)
        },
        spec,
    )
    check(run_sharded(plan, mesh), single_device)


@pytest.mark.slow
def test_mixed_plan_on_8x1(single_device):
    mesh = make_mesh(8)
    check(run_sharded(mixed_plan(mesh_spec(mesh), "column_wise", 5, "row_wise"), mesh), single_device)


@pytest.mark.slow
def test_the_hybrids_together_on_8x1(single_device):
    """The three two-level hybrids in one plan on a flat mesh (one host of 8 devices)."""
    mesh = make_mesh(8)
    spec = mesh_spec(mesh)
    plan = ShardingPlan(
        {
            "t0": plan_for_strategy(CONFIG.tables, spec, "grid").tables["t0"],
            "t1": plan_for_strategy(CONFIG.tables, spec, "table_column_wise").tables["t1"],
            "t2": plan_for_strategy(CONFIG.tables, spec, "table_row_wise").tables["t2"],
        },
        spec,
    )
    check(run_sharded(plan, mesh), single_device)


def test_the_sparse_dist_pipeline_trains_like_none_to_a_short_last_batch():
    """Each step routes the next batch's ids; a shorter last batch and the end of the data
    change nothing: losses and tables equal the plain run's bit for bit."""
    mesh = make_mesh(8)
    plan = mixed_plan(mesh_spec(mesh), "row_wise", 3, "table_wise")
    placed = list(batches())[:4]
    placed[-1] = jax.tree.map(lambda x: x[:16], placed[-1])  # the data ends mid-batch
    results = []
    for pipeline in ("none", "sparse_dist"):
        trainer = ShardedTrainer(model(), optax.adam(0.01), plan, mesh, pipeline=pipeline)
        losses, state = _pipelined_losses(trainer, [trainer.shard_batch(b) for b in placed])
        results.append((losses, trainer.logical_tables(state)))
    (want, want_tables), (got, got_tables) = results
    assert got == want and len(got) == 4
    for name, table in want_tables.items():
        np.testing.assert_array_equal(got_tables[name], table, err_msg=name)


def _pipelined_losses(trainer, placed) -> tuple[list, object]:
    ran = [(state, float(loss)) for state, loss, _ in train_steps(trainer, trainer.init_state(), placed)]
    return [loss for _, loss in ran], ran[-1][0]


def test_semi_sync_looks_ahead_alike_on_one_device_and_sharded():
    """semi_sync trains each batch on rows one update late: its first step is the plain
    step's, later ones differ; sharded it computes what it computes on one device."""
    placed = list(batches())[:6]
    plain = _pipelined_losses(Trainer(model(), optax.adam(0.01)), placed)[0]
    one = Trainer(model(), optax.adam(0.01), pipeline="semi_sync")
    losses, state = _pipelined_losses(one, placed)
    assert losses[0] == plain[0] and losses[1:] != plain[1:]
    want = (losses, one.logical_tables(state), nnx.to_pure_dict(state.params))
    mesh = make_mesh(8)
    sharded = ShardedTrainer(
        model(), optax.adam(0.01), mixed_plan(mesh_spec(mesh), "row_wise", 5, "column_wise"), mesh,
        pipeline="semi_sync",
    )  # fmt: skip
    losses, state = _pipelined_losses(sharded, [sharded.shard_batch(b) for b in placed])
    check((losses, sharded.logical_tables(state), nnx.to_pure_dict(state.params)), want)


def test_semi_sync_updates_the_tables_it_looked_up_in_place():
    """The next batch's lookup reads the tables the step then updates: ordered so, XLA
    keeps no copy of them (one device; a data-parallel table on 8)."""
    wide = EmbeddingConfig(
        tables=(TableSpec(name="big", rows=50_000, dim=16, optimizer=OPT),),
        features=(FeatureSpec(name="f", table="big", max_ids=2),),
    )
    build = lambda: DLRM(wide, dense_features=5, bottom=(16, 16), top=(16, 1), rngs=nnx.Rngs(0))  # noqa: E731
    batch = Batch(
        dense=jnp.zeros((64, 5), jnp.float32),
        sparse=random_batch(wide, 64, seed=0),
        labels=jnp.zeros(64, jnp.float32),
    )
    table_bytes = 50_000 * 16 * 4
    mesh = make_mesh(8)
    plan = plan_for_strategy(wide.tables, mesh_spec(mesh), "data_parallel")
    for make in (
        lambda mode: Trainer(build(), optax.adam(0.01), pipeline=mode),
        lambda mode: ShardedTrainer(build, optax.adam(0.01), plan, mesh, pipeline=mode),
    ):
        plain, semi = make("none"), make("semi_sync")
        placed = plain.place_batch(batch)
        state = plain.init_state()
        base = plain.train_step.lower(state, placed).compile().memory_analysis().temp_size_in_bytes
        carry = semi.carry_step.lower(state, placed).out_info
        step = semi.pipelined_step.lower(state, carry, placed, placed).compile()
        assert step.memory_analysis().temp_size_in_bytes < base + table_bytes // 2, type(plain).__name__
