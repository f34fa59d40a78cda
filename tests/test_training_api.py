"""What a user's own model and loss get from the trainers: the whole output and the whole
batch in the loss (per-sample weights, extra targets), and the model's other state
(batch statistics) updated by the step, on one device and on eight."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recsys
from recsys.data import Dataset, train_batches
from recsys.synthetic import PlantedModel, SyntheticConfig

SYNTHETIC = SyntheticConfig(num_sparse=3, rows=40, max_ids=2)
CONFIG = SYNTHETIC.embedding_config(8, recsys.SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.1))
BATCH = 64


class TwoHeads(nnx.Module):
    """Two logits per sample from a dense tower (batch-normalized if `norm`) and the
    embeddings."""

    def __init__(self, *, norm: bool = False, rngs: nnx.Rngs):
        self.embedding = recsys.EmbeddingCollection(CONFIG, rngs=rngs)
        self.tower = nnx.Linear(SYNTHETIC.num_dense, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs) if norm else None
        self.features = [f.name for f in CONFIG.features]

    def __call__(self, dense, sparse):
        item = jnp.sum(self.embedding(sparse).stacked(self.features), axis=1)  # [batch, 8]
        user = self.tower(dense)
        user = user if self.norm is None else self.norm(user)
        return {"click": jnp.sum(user * item, axis=1), "like": jnp.sum(user[:, :4] * item[:, :4], axis=1)}


def two_task_loss(outputs, batch):
    click = optax.sigmoid_binary_cross_entropy(outputs["click"], batch.labels)
    return click + 0.5 * optax.sigmoid_binary_cross_entropy(outputs["like"], batch.targets["like"])


def batches(count: int, weighted: bool):
    planted = PlantedModel(SYNTHETIC, seed=0)
    data = Dataset.in_memory(planted.generate(BATCH * count, seed=0).examples())
    rng = np.random.default_rng(0)
    out = []
    for examples, _ in train_batches(data, BATCH, seed=0):
        batch = recsys.to_batch(CONFIG, examples)
        extra = {"like": (rng.random(BATCH) < 0.3).astype(np.float32)}
        weights = rng.uniform(0.1, 2.0, BATCH).astype(np.float32) if weighted else None
        out.append(recsys.Batch(batch.dense, batch.sparse, batch.labels, weights, extra))
        if len(out) == count:
            return out


def trainers(norm: bool):
    build = lambda: TwoHeads(norm=norm, rngs=nnx.Rngs(0))  # noqa: E731
    one = recsys.Trainer(build(), optax.sgd(0.05), loss_fn=two_task_loss, predict_fn=lambda o: o)
    mesh = recsys.make_mesh("device=8")
    plan = recsys.plan_for_strategy(CONFIG.tables, recsys.mesh_spec(mesh), "row_wise")
    eight = recsys.ShardedTrainer(
        build, optax.sgd(0.05), plan, mesh, loss_fn=two_task_loss, predict_fn=lambda o: o
    )
    return one, eight


def train(trainer, data):
    state, losses = trainer.init_state(), []
    for batch in data:
        state, loss = trainer.train_step(state, trainer.place_batch(batch))
        losses.append(float(loss))
    return state, np.asarray(losses)


@pytest.mark.slow
def test_a_weighted_multi_task_loss_trains_alike_on_one_device_and_eight():
    data = batches(3, weighted=True)
    one, eight = trainers(norm=False)
    first = jax.tree.map(jnp.asarray, data[0])
    # The loss the step reports is the weighted mean of the per-sample losses.
    per_sample = two_task_loss(TwoHeads(rngs=nnx.Rngs(0))(first.dense, first.sparse), first)
    want = float(jnp.sum(first.weights * per_sample) / jnp.sum(first.weights))
    one_state, one_losses = train(one, data)
    np.testing.assert_allclose(one_losses[0], want, rtol=1e-5)
    # Eight devices minimize the same global weighted mean: the same losses and tables.
    eight_state, eight_losses = train(eight, data)
    np.testing.assert_allclose(eight_losses, one_losses, rtol=1e-5)
    for name, table in one.logical_tables(one_state).items():
        np.testing.assert_allclose(eight.logical_tables(eight_state)[name], table, rtol=1e-4, atol=1e-6)
    # Predictions are the model's whole output (`predict_fn`).
    placed = eight.place_batch(data[0])
    predicted = eight.predict(eight_state, placed.dense, placed.sparse)
    assert set(predicted) == {"click", "like"} and predicted["click"].shape == (BATCH,)


def test_one_step_moves_batch_statistics_as_the_model_does():
    data = batches(1, weighted=False)
    one, _ = trainers(norm=True)
    state, _ = train(one, data)
    model = TwoHeads(norm=True, rngs=nnx.Rngs(0))
    model(jnp.asarray(data[0].dense), jax.tree.map(jnp.asarray, data[0].sparse))
    for stat in ("mean", "var"):
        got = nnx.to_pure_dict(state.rest)["norm"][stat]
        np.testing.assert_allclose(got, getattr(model.norm, stat)[...], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_sharded_batch_statistics_stay_replicated_and_move():
    """Each device normalizes with its own samples' statistics; the running statistics
    are averaged over the devices, so they stay one replicated value."""
    data = batches(1, weighted=False)
    one, eight = trainers(norm=True)
    one_state, _ = train(one, data)
    eight_state, _ = train(eight, data)
    mean = nnx.to_pure_dict(eight_state.rest)["norm"]["mean"]
    assert mean.sharding.is_fully_replicated and not np.allclose(mean, 0)
    # The mean of the devices' batch means is the batch mean: after one step from the same
    # weights, the running means agree.
    np.testing.assert_allclose(mean, nnx.to_pure_dict(one_state.rest)["norm"]["mean"], rtol=1e-4, atol=1e-6)


def test_a_loss_must_give_one_value_per_sample():
    one = recsys.Trainer(
        TwoHeads(rngs=nnx.Rngs(0)), optax.sgd(0.05), loss_fn=lambda o, b: jnp.mean(o["click"])
    )
    batch = one.place_batch(batches(1, weighted=False)[0])
    with pytest.raises(
        ValueError, match=r"loss_fn must return one loss per sample, shape \[batch\]; got \(\)"
    ):
        one.train_step(one.init_state(), batch)


class DroppedTower(nnx.Module):
    """One logit per sample: dropout on a row of ones, weighted by `w`, plus the
    embeddings. The gradient of `w` counts the kept units over the batch."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embedding = recsys.EmbeddingCollection(CONFIG, rngs=rngs)
        self.w = nnx.Param(jnp.zeros(16))
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.features = [f.name for f in CONFIG.features]

    def __call__(self, dense, sparse):
        item = jnp.sum(self.embedding(sparse).stacked(self.features), axis=(1, 2))
        kept = self.dropout(jnp.ones((dense.shape[0], 16)))
        return kept @ self.w + item


def kept_counts(trainer, batch) -> np.ndarray:
    """Per unit, how many of the batch's samples kept it in one step (SGD with rate 1 on
    the mean loss: w moves by minus the mean of the masks, and a kept unit is 2)."""
    state, _ = trainer.train_step(trainer.init_state(), trainer.place_batch(batch))
    w = nnx.to_pure_dict(jax.device_get(state.params))["w"]
    return np.rint(-w * BATCH / 2).astype(int)


@pytest.mark.slow
def test_dropout_draws_new_masks_each_step_and_differ_per_device():
    identity = lambda outputs, batch: outputs  # noqa: E731
    # Eight identical shards: the same eight samples on every device.
    batch = batches(1, weighted=False)[0]
    batch = jax.tree.map(lambda x: np.concatenate([x[:8]] * 8), batch)
    one = recsys.Trainer(DroppedTower(rngs=nnx.Rngs(0)), optax.sgd(1.0), loss_fn=identity)
    state = one.init_state()
    placed = one.place_batch(batch)
    w = lambda s: np.asarray(nnx.to_pure_dict(s.params)["w"])  # noqa: E731
    state, _ = one.train_step(state, placed)
    first = w(state)  # the step donates its input state: read it before the next
    state, _ = one.train_step(state, placed)
    # The loss is linear in w: each step moves it by minus that step's mean mask.
    assert not np.allclose(first, w(state) - first)
    mesh = recsys.make_mesh("device=8")
    plan = recsys.plan_for_strategy(CONFIG.tables, recsys.mesh_spec(mesh), "row_wise")
    eight = recsys.ShardedTrainer(
        lambda: DroppedTower(rngs=nnx.Rngs(0)), optax.sgd(1.0), plan, mesh, loss_fn=identity
    )
    counts = kept_counts(eight, batch)
    assert 0 < counts.sum() < 16 * BATCH
    # Had every device drawn the same masks, each count would be a multiple of eight.
    assert np.any(counts % 8 != 0), counts
