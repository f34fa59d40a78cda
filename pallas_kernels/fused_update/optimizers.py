"""Row optimizers applied inside the fused update kernels, on float32 `[rows, dim]` blocks.

Formulas (g includes weight_decay * w when set; t = step + 1):
  sgd:              w -= lr * g
  adagrad:          a += g^2;          w -= lr * g * rsqrt(a + eps)  (0 where a == 0)
  rowwise_adagrad:  a += mean_d(g^2);  w -= lr * g / (sqrt(a) + eps)  (a is [rows, 1])
  adam:             m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
                    w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
The same formulas as `recsys.sparse_optim`, restated here because kernels know nothing
of `recsys` (the dependency points the other way).
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp


class OptimizerKind(str, enum.Enum):
    """Sparse row optimizers; each touches only the rows a batch looked up."""

    SGD = "sgd"  # w -= lr * g
    ADAGRAD = "adagrad"  # per-element accumulator, optax.adagrad semantics
    ROWWISE_ADAGRAD = "rowwise_adagrad"  # one accumulator per row (FBGEMM's EXACT_ROWWISE)
    ADAM = "adam"  # lazy Adam: moments of untouched rows do not decay


KINDS = tuple(k.value for k in OptimizerKind)
# The state arrays each optimizer keeps per row.
STATE_NAMES = {
    OptimizerKind.SGD: (),
    OptimizerKind.ADAGRAD: ("acc",),
    OptimizerKind.ROWWISE_ADAGRAD: ("acc",),
    OptimizerKind.ADAM: ("m", "v"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowOptimizer:
    """A sparse optimizer's hyperparameters, baked into the kernel as constants, except
    the learning rate of each step, a runtime scalar (`step_scalars`): a schedule changes
    it without a recompile."""

    kind: str  # one of KINDS
    learning_rate: float
    eps: float = 1e-8
    weight_decay: float = 0.0
    beta1: float = 0.9  # adam only
    beta2: float = 0.999  # adam only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"optimizer kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {self.eps}, {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")

    def state_names(self) -> tuple[str, ...]:
        return STATE_NAMES[OptimizerKind(self.kind)]

    def state_width(self, dim: int) -> int:
        """Columns of each state array: one per row for row-wise Adagrad, else `dim`."""
        return 1 if self.kind == "rowwise_adagrad" else dim

    def step_scalars(self, step: jax.Array, lr_scale: jax.Array | float = 1.0) -> jax.Array:
        """[3] float32: Adam's bias corrections (1 - b1^t, 1 - b2^t) for its step t = step
        + 1 (ones for the other kinds), and this step's learning rate, `learning_rate *
        lr_scale`."""
        lr = jnp.float32(self.learning_rate) * jnp.asarray(lr_scale, jnp.float32)
        if self.kind != "adam":
            return jnp.stack([jnp.float32(1), jnp.float32(1), lr])
        t = jnp.asarray(step, jnp.float32) + 1
        return jnp.stack([1 - self.beta1**t, 1 - self.beta2**t, lr]).astype(jnp.float32)

    def apply(self, values, grads, state: tuple, scalars) -> tuple[jax.Array, tuple]:
        """(new values, new state) of float32 blocks; `scalars`: the three of `step_scalars`."""
        c1, c2, lr = scalars
        eps = self.eps
        if self.weight_decay:
            grads = grads + self.weight_decay * values
        if self.kind == "sgd":
            return values - lr * grads, ()
        if self.kind == "adagrad":
            (acc,) = state
            acc = acc + grads * grads
            scale = jnp.where(acc > 0, jax.lax.rsqrt(acc + eps), 0.0)
            return values - lr * (grads * scale), (acc,)
        if self.kind == "rowwise_adagrad":
            (acc,) = state
            acc = acc + jnp.mean(grads * grads, axis=1, keepdims=True)
            return values - lr * grads / (jnp.sqrt(acc) + eps), (acc,)
        m, v = state
        m = self.beta1 * m + (1 - self.beta1) * grads
        v = self.beta2 * v + (1 - self.beta2) * grads * grads
        return values - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps)), (m, v)
