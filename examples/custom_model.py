"""Put the embedding collection in a model of your own and train it with the split step.

    python examples/custom_model.py

A small two-tower-style scorer: the user tower is a dense MLP, the item side is the
mean of several embedding features; the score is their dot product. The model only
hands its sparse input to `EmbeddingCollection`; `Trainer` does the sparse update.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recsys import EmbeddingCollection, metrics
from recsys.specs import SparseOptimizerSpec
from recsys.synthetic import PlantedModel, SyntheticConfig
from recsys.train import to_batch, train_batches
from recsys.trainer import Trainer


class DotScorer(nnx.Module):
    def __init__(self, config, dense_features: int, dim: int, *, rngs: nnx.Rngs):
        self.embedding = EmbeddingCollection(config, rngs=rngs)
        self.features = [f.name for f in config.features]
        self.user = nnx.Sequential(
            nnx.Linear(dense_features, 32, rngs=rngs), jax.nn.relu, nnx.Linear(32, dim, rngs=rngs)
        )
        self.bias = nnx.Param(jnp.zeros(()))

    def __call__(self, dense, sparse):
        acts = self.embedding(sparse)
        item = jnp.mean(acts.stacked(self.features), axis=1)  # [batch, dim]
        return jnp.sum(self.user(dense) * item, axis=1) + self.bias[...]


def main():
    synthetic = SyntheticConfig(num_sparse=4, rows=300)
    planted = PlantedModel(synthetic, seed=0)
    train_data, eval_data = planted.generate(50_000, seed=0), planted.generate(5_000, seed=1)
    config = synthetic.embedding_config(16, SparseOptimizerSpec(kind="adam", learning_rate=0.01))
    trainer = Trainer(DotScorer(config, synthetic.num_dense, 16, rngs=nnx.Rngs(0)), optax.adam(0.01))
    state = trainer.init_state()
    for part in train_batches(train_data, 256, len(train_data) // 256, seed=0):
        state, loss = trainer.train_step(state, to_batch(config, part))
    batch = to_batch(config, eval_data)
    probs = np.asarray(trainer.predict(state, batch.dense, batch.sparse))
    print(f"final train loss {float(loss):.4f}, eval AUC {metrics.auc(eval_data.labels, probs):.4f}")


if __name__ == "__main__":
    main()
