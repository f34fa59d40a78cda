"""Losses of the train step: `loss_fn(outputs, batch) -> [batch]` per-sample losses.

A loss sees the model's whole output (an array or any pytree: one logit per task, a
score matrix) and the whole `Batch` (labels, per-sample `weights`, extra `targets`), so
multi-task and retrieval losses fit the same step. The trainers reduce the per-sample
losses themselves (`mean_loss`): the mean, or the weighted mean under `batch.weights`,
over the whole global batch, also when it is sharded over devices.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from recsys.batching import Batch

LossFn = Callable[[object, Batch], jax.Array]


def binary_cross_entropy(logits: jax.Array, batch: Batch) -> jax.Array:
    """Per-sample log-loss of one logit per sample against 0/1 labels: [batch]."""
    return optax.sigmoid_binary_cross_entropy(logits, batch.labels)


def mean_loss(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The mean of per-sample `losses` [batch], weighted by `weights` [batch] if given."""
    if weights is None:
        return jnp.mean(_checked(losses, None))
    return weighted_sum(losses, weights) / jnp.sum(weights)


def weighted_sum(losses: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * losses) of per-sample `losses` [batch]."""
    return jnp.sum(weights * _checked(losses, weights))


def _checked(losses: jax.Array, weights: jax.Array | None) -> jax.Array:
    if losses.ndim != 1 or (weights is not None and weights.shape != losses.shape):
        raise ValueError(
            f"loss_fn must return one loss per sample, shape [batch]; got {losses.shape}"
            + ("" if weights is None else f" for weights of shape {weights.shape}")
        )
    return losses
