"""A checkpoint written under one mesh and plan restores under another, and on one device."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mesh import make_mesh, mesh_spec, plan_for_strategy
from recsys.training import Checkpointer, CheckpointMismatch, ShardedTrainer, Trainer
from tests.test_sharded_training import CONFIG, batches, model


@pytest.mark.slow
def test_table_wise_on_8_restores_row_wise_on_2_and_on_one_device(tmp_path):
    data = list(batches())
    mesh8 = make_mesh(8)
    first = ShardedTrainer(
        model(), optax.adam(0.01), plan_for_strategy(CONFIG.tables, mesh_spec(mesh8), "table_wise"), mesh8
    )
    state = first.init_state()
    placed = {name: table.sharding for name, table in state.tables.items()}
    for batch in data[:3]:
        state, _ = first.train_step(state, first.shard_batch(batch))
    # The step returns the tables sharded as init_state placed them: otherwise its second
    # call recompiles.
    assert {name: table.sharding for name, table in state.tables.items()} == placed
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(3, first, state, {"note": "tw8"})
    ckpt.wait()
    probe = data[3]
    placed8 = first.shard_batch(probe)
    want = np.asarray(first.predict(state, placed8.dense, placed8.sparse))
    saved = ocp.StandardCheckpointer().restore(tmp_path / "3" / "state")
    assert saved["tables"]["t2"].shape == (200, 8)  # the logical shape, not a plan's storage

    mesh2 = make_mesh(2, jax.devices()[:2])
    second = ShardedTrainer(
        model(), optax.adam(0.01), plan_for_strategy(CONFIG.tables, mesh_spec(mesh2), "row_wise"), mesh2
    )
    restored, metadata = ckpt.restore(second, second.init_state())
    assert metadata == {"note": "tw8"} and int(restored.step) == 3
    placed = second.shard_batch(probe)
    np.testing.assert_allclose(
        np.asarray(second.predict(restored, placed.dense, placed.sparse)), want, rtol=1e-6
    )

    single = Trainer(model(), optax.adam(0.01))
    restored1, _ = ckpt.restore(single, single.init_state())
    np.testing.assert_allclose(
        np.asarray(single.predict(restored1, probe.dense, probe.sparse)), want, rtol=1e-6
    )

    # Training continues identically from either restore.
    _, loss2 = second.train_step(restored, placed)
    _, loss1 = single.train_step(restored1, probe)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-5)


def test_sharded_restore_of_another_model_is_refused(tmp_path):
    mesh = make_mesh(8)
    trainer = ShardedTrainer(
        model(), optax.adam(0.01), plan_for_strategy(CONFIG.tables, mesh_spec(mesh), "row_wise"), mesh
    )
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, trainer, trainer.init_state(), {})
    ckpt.wait()
    from flax import nnx

    from recsys.models import DLRM

    other = Trainer(
        DLRM(CONFIG, dense_features=5, bottom=(32, 8), top=(16, 1), rngs=nnx.Rngs(0)), optax.adam(0.01)
    )
    with pytest.raises(CheckpointMismatch, match="dense_params"):
        ckpt.restore(other, other.init_state())
