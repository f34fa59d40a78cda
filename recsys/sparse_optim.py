"""Sparse row optimizers with optax's init/update shape, applied to touched rows only.

`init(rows, dim)` returns the optimizer's slot arrays for a stacked table; `update` takes
the float32 values, summed gradients and slot rows of the unique rows a batch touched
(`[unique, dim]`, one entry per row, duplicates already summed) and returns their new
values. Rows a batch did not touch are never read or written, so their values and slots
stay bitwise unchanged (for Adam this is "lazy" Adam: untouched moments do not decay).

Slots are stored in `spec.state_dtype`; `update` takes and returns float32 slot rows and
the caller stores them back (`recsys.sparse_update.round_slot_rows`).

Formulas (g includes weight_decay * w when set; lr is `spec.rate(step)`, the schedule's):
  sgd:              w -= lr * g
  adagrad:          a += g^2;            w -= lr * g / sqrt(a + eps)   (optax.adagrad)
  rowwise_adagrad:  a += mean_d(g^2);    w -= lr * g / (sqrt(a) + eps) (one a per row)
  adam:             m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; t = step + 1
                    w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from recsys.specs import OptimizerKind, SparseOptimizerSpec

Slots = dict[str, jax.Array]


class RowOptimizer(NamedTuple):
    # (rows, dim) -> slot arrays, each with leading axis `rows`.
    init: Callable[[int, int], Slots]
    # (values [u, dim] f32, grads [u, dim] f32, slot rows, step, row_mean_sq=None)
    #   -> (new values, new slot rows). `row_mean_sq` [u] overrides row-wise Adagrad's
    #   mean_d(g^2) when the rows given are column shards of longer rows (the caller
    #   computes it over the whole row); the other optimizers ignore it.
    update: Callable[..., tuple[jax.Array, Slots]]


def row_optimizer(spec: SparseOptimizerSpec) -> RowOptimizer:
    optimizer = _row_optimizer(spec)
    dtype = jnp.dtype(spec.state_dtype)
    if dtype == jnp.float32:
        return optimizer
    init = lambda rows, dim: {k: v.astype(dtype) for k, v in optimizer.init(rows, dim).items()}  # noqa: E731
    return RowOptimizer(init, optimizer.update)


def _row_optimizer(spec: SparseOptimizerSpec) -> RowOptimizer:
    eps, wd = spec.eps, spec.weight_decay

    def with_decay(values, grads):
        return grads + wd * values if wd else grads

    if spec.kind is OptimizerKind.SGD:

        def update(values, grads, slots, step, row_mean_sq=None):
            lr = spec.rate(step)
            return values - lr * with_decay(values, grads), slots

        return RowOptimizer(lambda rows, dim: {}, update)

    if spec.kind is OptimizerKind.ADAGRAD:

        def update(values, grads, slots, step, row_mean_sq=None):
            lr = spec.rate(step)
            grads = with_decay(values, grads)
            acc = slots["acc"] + grads * grads
            scale = jnp.where(acc > 0, jax.lax.rsqrt(acc + eps), 0.0)
            return values - lr * (grads * scale), {"acc": acc}

        def init(rows, dim):
            return {"acc": jnp.full((rows, dim), spec.initial_accumulator, jnp.float32)}

        return RowOptimizer(init, update)

    if spec.kind is OptimizerKind.ROWWISE_ADAGRAD:

        def update(values, grads, slots, step, row_mean_sq=None):
            lr = spec.rate(step)
            grads = with_decay(values, grads)
            acc = slots["acc"] + (jnp.mean(grads * grads, axis=-1) if row_mean_sq is None else row_mean_sq)
            return values - lr * grads / (jnp.sqrt(acc)[:, None] + eps), {"acc": acc}

        def init(rows, dim):
            return {"acc": jnp.full((rows,), spec.initial_accumulator, jnp.float32)}

        return RowOptimizer(init, update)

    if spec.kind is OptimizerKind.ADAM:
        b1, b2 = spec.beta1, spec.beta2

        def update(values, grads, slots, step, row_mean_sq=None):
            lr = spec.rate(step)
            grads = with_decay(values, grads)
            m = b1 * slots["m"] + (1 - b1) * grads
            v = b2 * slots["v"] + (1 - b2) * grads * grads
            t = (step + 1).astype(jnp.float32)
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            return values - lr * (m_hat / (jnp.sqrt(v_hat) + eps)), {"m": m, "v": v}

        def init(rows, dim):
            # Two arrays, not one shared: the train step donates each slot buffer.
            return {"m": jnp.zeros((rows, dim), jnp.float32), "v": jnp.zeros((rows, dim), jnp.float32)}

        return RowOptimizer(init, update)

    raise ValueError(f"unknown sparse optimizer {spec.kind!r}")
