"""Plain-jnp fused backward + optimizer: the truth both kernel flavours are tested against.

Written from scratch rather than from the kernels' blocks: per-row gradient sums by
`segment_sum` over the stably sorted occurrences, the optimizer formulas spelled out on
the unique rows, rows scattered back. Stochastic rounding uses the same counter-based
bits as the kernels (`rounding.random_bits` of seed, row, column), so results agree to
float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.fused_update.optimizers import RowOptimizer
from pallas_kernels.fused_update.rounding import random_bits, round_state, stochastic_round


def fused_update_reference(
    table: jax.Array,
    state: dict[str, jax.Array],
    ids: jax.Array,
    coef: jax.Array,
    src: jax.Array,
    grads: jax.Array,
    *,
    optimizer: RowOptimizer,
    step: jax.Array | int = 0,
    lr_scale: jax.Array | float = 1.0,
    seed: jax.Array | int = 0,
    stochastic_rounding: bool = True,
    row_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Same contract as `fused_update`; see there."""
    rows, dim = table.shape
    n = ids.shape[0]
    valid = (ids >= 0) & (ids < rows)
    key = jnp.where(valid, ids, rows)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    first = jnp.concatenate([jnp.ones((1,), bool), sorted_key[1:] != sorted_key[:-1]])
    segment = jnp.cumsum(first) - 1
    contrib = grads[src[order]].astype(jnp.float32) * jnp.where(valid[order], coef[order], 0.0)[:, None]
    g = jax.ops.segment_sum(contrib, segment, num_segments=n)  # [n, dim]; slot u = u-th unique key
    unique = jnp.zeros((n,), jnp.int32).at[jnp.where(first, segment, n)].set(sorted_key, mode="drop")
    is_row = jnp.zeros((n,), bool).at[jnp.where(first, segment, n)].set(sorted_key < rows, mode="drop")
    target = jnp.where(is_row, unique, rows)  # rows beyond the table are dropped on scatter

    w = table[jnp.where(is_row, unique, 0)].astype(jnp.float32)
    s = {k: v.reshape(rows, -1)[jnp.where(is_row, unique, 0)].astype(jnp.float32) for k, v in state.items()}
    lr = optimizer.learning_rate * jnp.asarray(lr_scale, jnp.float32)
    eps, wd = optimizer.eps, optimizer.weight_decay
    g = g + wd * w
    if optimizer.kind == "sgd":
        new_w, new_s = w - lr * g, {}
    elif optimizer.kind == "adagrad":
        acc = s["acc"] + g**2
        new_w = w - lr * jnp.where(acc > 0, g / jnp.sqrt(acc + eps), 0.0)
        new_s = {"acc": acc}
    elif optimizer.kind == "rowwise_adagrad":
        acc = s["acc"] + jnp.mean(g**2, axis=1, keepdims=True)
        new_w, new_s = w - lr * g / (jnp.sqrt(acc) + eps), {"acc": acc}
    else:
        t = jnp.asarray(step, jnp.float32) + 1
        m = optimizer.beta1 * s["m"] + (1 - optimizer.beta1) * g
        v = optimizer.beta2 * s["v"] + (1 - optimizer.beta2) * g**2
        m_hat, v_hat = m / (1 - optimizer.beta1**t), v / (1 - optimizer.beta2**t)
        new_w, new_s = w - lr * m_hat / (jnp.sqrt(v_hat) + eps), {"m": m, "v": v}

    seed = jnp.asarray(seed, jnp.int32)
    keyed = unique if row_keys is None else row_keys.at[unique].get(mode="fill", fill_value=0)
    if stochastic_rounding and table.dtype != jnp.float32:
        bits = random_bits(seed, keyed[:, None], jnp.arange(dim)[None, :])
        stored = stochastic_round(new_w, bits, table.dtype)
    else:
        stored = new_w.astype(table.dtype)
    table = table.at[target].set(stored, mode="drop")

    def store_state(k, v):
        value = new_s[k]  # [n, width]
        if stochastic_rounding:
            columns = jnp.arange(value.shape[1])[None, :]
            value = round_state(value, seed, k, keyed[:, None], columns, v.dtype)
        return v.at[target].set(value.reshape((n,) + v.shape[1:]).astype(v.dtype), mode="drop")

    return table, {k: store_state(k, v) for k, v in state.items()}
