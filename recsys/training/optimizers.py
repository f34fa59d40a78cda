"""The dense parameters' optimizers by name, as the CLI offers them.

AdamW decouples its weight decay from the gradient scale; the others add the decay to
the gradient. Adagrad's accumulators start at 0 with eps 1e-8, as the tables' Adagrad
(`SparseOptimizerSpec`) and PyTorch's do (MLPerf DLRM-DCNv2 trains both with it);
optax's own default starts them at 0.1. A cosine schedule decays the learning rate to 0 over the run: late
epochs refine instead of memorizing (on Frappe it held the test AUC at its peak).
"""

from __future__ import annotations

import optax


def _decayed(opt: optax.GradientTransformation, weight_decay: float) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), opt) if weight_decay else opt


# (learning rate or schedule, weight decay) -> optax transformation.
DENSE_OPTIMIZERS = {
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    "adam": lambda lr, wd: _decayed(optax.adam(lr), wd),
    "adagrad": lambda lr, wd: _decayed(optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-8), wd),
    "sgd": lambda lr, wd: _decayed(optax.sgd(lr), wd),
}
SCHEDULES = ("cosine", "constant")


def dense_optimizer(
    name: str, learning_rate: float, weight_decay: float, *, schedule: str = "constant", steps: int = 1
) -> optax.GradientTransformation:
    """`name` (one of `DENSE_OPTIMIZERS`) at `learning_rate`, constant or decayed to 0 over
    `steps` steps on a cosine."""
    if name not in DENSE_OPTIMIZERS:
        raise ValueError(f"dense optimizer must be one of {', '.join(DENSE_OPTIMIZERS)}, got {name!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    lr = optax.cosine_decay_schedule(learning_rate, steps) if schedule == "cosine" else learning_rate
    return DENSE_OPTIMIZERS[name](lr, weight_decay)
