"""Training: the split train step on one device (`Trainer`) and over a mesh
(`ShardedTrainer`), their losses, and checkpoints.

Both trainers offer one protocol: `init_state()`, `place_batch(batch)`,
`train_step(state, batch) -> (state, loss)`, `predict(state, dense, sparse)`,
`logical_tables(state)`, and `to_logical(state)` / `from_logical(template, tree)`, the
plan-independent form `Checkpointer` saves and restores.
"""

from recsys.training.checkpoint import Checkpointer, CheckpointMismatch
from recsys.training.losses import LossFn, binary_cross_entropy, mean_loss
from recsys.training.sharded import ShardedState, ShardedTrainer
from recsys.training.trainer import Trainer, TrainState

__all__ = [
    "CheckpointMismatch",
    "Checkpointer",
    "LossFn",
    "ShardedState",
    "ShardedTrainer",
    "TrainState",
    "Trainer",
    "binary_cross_entropy",
    "mean_loss",
]
