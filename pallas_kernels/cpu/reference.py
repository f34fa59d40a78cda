"""Plain-jnp references of the CPU kernels (`pallas_kernels.cpu`): the truth the tests
compare the C++ against, written for clarity rather than speed."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def pooled_lookup_reference(table, ids, coef):
    """[batch, features, dim] float32: out[b, f] = sum_l coef[f, b, l] * table[ids[f, b, l]];
    positions with coef 0 are not read (their ids may be anything)."""
    safe = jnp.where(coef != 0, ids, 0)
    return jnp.einsum("fbl,fbld->bfd", coef, table[safe].astype(jnp.float32))


def rowwise_adagrad_reference(table, acc, ids, coef, src, grads, *, learning_rate, eps, weight_decay=0.0):
    """(table, acc) after row-wise Adagrad on the rows `ids` touch: each touched row's
    gradient g = sum over its occurrences of coef * grads[src] (+ weight_decay * row),
    acc += mean(g^2), row -= learning_rate * g / (sqrt(acc) + eps). Ids -1 are skipped;
    other rows stay as they are."""
    rows = table.shape[0]
    valid = ids >= 0
    target = jnp.where(valid, ids, rows)  # one past the table: dropped
    contribution = jnp.where(valid[:, None], coef[:, None] * grads[src], 0.0)
    summed = jnp.zeros((rows + 1, table.shape[1]), jnp.float32).at[target].add(contribution)[:rows]
    touched = jnp.zeros((rows + 1,), bool).at[target].set(True)[:rows]
    g = summed + weight_decay * table
    new_acc = jnp.where(touched, acc + jnp.mean(g * g, axis=1), acc)
    step = learning_rate * g / (jnp.sqrt(new_acc)[:, None] + eps)
    return jnp.where(touched[:, None], table - step, table), new_acc


def matmul_reference(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in float32, op transposing when asked."""
    return jnp.matmul(a.T if trans_a else a, b.T if trans_b else b, precision="highest")


def pairwise_dots_reference(x, emb):
    """[batch, (F + 1) * F / 2]: the dot product of every pair i < j of each sample's
    vectors [x, emb[0], ..., emb[F - 1]], in `np.triu_indices(F + 1, 1)` order."""
    vectors = jnp.concatenate([x[:, None], emb], axis=1)
    i, j = np.triu_indices(vectors.shape[1], k=1)
    return jnp.einsum("bfd,bgd->bfg", vectors, vectors, precision="highest")[:, i, j]
