"""Your own Flax model with sharded embeddings: the same model trained on one device and
with its tables sharded over eight.

    python examples/custom_model.py            # about a minute on a 2-core CPU
    python examples/custom_model.py --small    # a few seconds

A two-tower-style scorer: the user tower is a dense MLP with batch normalization, the
item side the mean of several embedding features, the score their dot product. The
model only hands its sparse input to `EmbeddingCollection`; the trainers look the ids
up, differentiate the model with respect to the activations, update the touched rows
with the sparse optimizer and the batch statistics with the step. On CPU the eight
devices are simulated.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import recsys
from recsys import metrics
from recsys.data import Dataset, train_batches
from recsys.synthetic import PlantedModel, SyntheticConfig


class DotScorer(nnx.Module):
    def __init__(self, config: recsys.EmbeddingConfig, dense_features: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = recsys.EmbeddingCollection(config, rngs=rngs)
        self.features = [f.name for f in config.features]
        self.user = nnx.Sequential(
            nnx.Linear(dense_features, 32, rngs=rngs),
            nnx.BatchNorm(32, rngs=rngs),
            jax.nn.relu,
            nnx.Linear(32, dim, rngs=rngs),
        )
        self.bias = nnx.Param(jnp.zeros(()))

    def __call__(self, dense, sparse):
        acts = self.embedding(sparse)
        item = jnp.mean(acts.stacked(self.features), axis=1)  # [batch, dim]
        return jnp.sum(self.user(dense) * item, axis=1) + self.bias[...]


def train_and_evaluate(trainer, config, train_data: Dataset, eval_data, steps: int, batch_size: int):
    state = trainer.init_state()
    for examples, _ in train_batches(train_data, batch_size, seed=0):
        state, loss = trainer.train_step(state, trainer.place_batch(recsys.to_batch(config, examples)))
        if int(state.step) == steps:
            break
    batch = trainer.place_batch(recsys.to_batch(config, eval_data.examples()))
    probs = np.asarray(trainer.predict(state, batch.dense, batch.sparse))
    return float(loss), metrics.auc(eval_data.labels, probs)


def main(argv=None):
    p = argparse.ArgumentParser(description="a user's model on one device and on eight")
    p.add_argument("--small", action="store_true", help="a few seconds of training")
    args = p.parse_args(argv)
    recsys.simulate_cpu_devices(8)  # on CPU, before JAX starts
    samples, steps = (4_096, 20) if args.small else (50_000, 190)
    synthetic = SyntheticConfig(num_sparse=4, rows=300)
    planted = PlantedModel(synthetic, seed=0)
    train_data = Dataset.in_memory(planted.generate(samples, seed=0).examples())
    eval_data = planted.generate(samples // 10 // 8 * 8, seed=1)
    config = synthetic.embedding_config(16, recsys.SparseOptimizerSpec(kind="adam", learning_rate=0.01))
    build = lambda: DotScorer(config, synthetic.num_dense, 16, rngs=nnx.Rngs(0))  # noqa: E731

    one = recsys.Trainer(build(), optax.adam(0.01))
    mesh = recsys.make_mesh("device=8")
    plan = recsys.plan_model(config, mesh, batch_size=256).plan  # the cost-model planner
    eight = recsys.ShardedTrainer(build, optax.adam(0.01), plan, mesh)
    for name, trainer in (("one device", one), ("8 devices", eight)):
        loss, auc = train_and_evaluate(trainer, config, train_data, eval_data, steps, 256)
        print(f"{name}: final train loss {loss:.4f}, eval AUC {auc:.4f}")


if __name__ == "__main__":
    main()
