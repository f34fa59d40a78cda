"""Each sparse optimizer against a dense optax (or plain jnp) reference on touched rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recsys.lookup import init_tables, lookup, reference_lookup, unstack_tables
from recsys.sparse import RaggedIds, pack_batch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig, FeatureSpec, LRSchedule, SparseOptimizerSpec, TableSpec
from tests.conftest import make_config, random_batch

LR = 0.05
# Jitted once per config: eager lookups of the long-bag feature cost seconds each.
jit_lookup = jax.jit(lookup, static_argnums=0)
jit_update = jax.jit(
    sparse_update, static_argnums=0, static_argnames=("dedup", "optimizer_chunk", "accumulator")
)


@functools.partial(jax.jit, static_argnums=0)
def reference_grads(config, tables, batch, weights):
    def loss(tables):
        out = reference_lookup(config, tables, batch)
        return sum(jnp.sum(out[k] * weights[k]) for k in out)

    return jax.grad(loss)(tables)


def rowwise_adagrad(lr, eps):
    """Dense reference of row-wise Adagrad (optax has none): one accumulator per row."""

    def init(params):
        return jax.tree.map(lambda p: jnp.zeros(p.shape[:1]), params)

    def update(grads, state, params=None):
        state = jax.tree.map(lambda a, g: a + jnp.mean(g * g, axis=1), state, grads)
        updates = jax.tree.map(lambda g, a: -lr * g / (jnp.sqrt(a)[:, None] + eps), grads, state)
        return updates, state

    return optax.GradientTransformation(init, update)


CASES = {
    "sgd": (SparseOptimizerSpec(kind="sgd", learning_rate=LR), optax.sgd(LR)),
    "adagrad": (
        SparseOptimizerSpec(kind="adagrad", learning_rate=LR, initial_accumulator=0.1, eps=1e-7),
        optax.adagrad(LR, initial_accumulator_value=0.1, eps=1e-7),
    ),
    "rowwise_adagrad": (
        SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=LR),
        rowwise_adagrad(LR, 1e-8),
    ),
    "adam": (SparseOptimizerSpec(kind="adam", learning_rate=LR), optax.adam(LR)),
}


def touched_rows(config, batch):
    touched = {t.name: np.zeros(t.rows, bool) for t in config.tables}
    for spec in config.features:
        f = batch[spec.name]
        touched[spec.table][np.asarray(f.ids)[np.asarray(f.valid_mask())]] = True
    return touched


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dedup", ["marker", "sort"])
def test_sparse_optimizer_matches_dense_reference(name, dedup):
    spec, dense_tx = CASES[name]
    config = make_config(spec)
    stacked = init_tables(config, jax.random.key(0))
    slots = init_slots(config)
    logical = unstack_tables(config, stacked)
    ref_state = dense_tx.init(logical)
    for step in range(3):
        batch = random_batch(config, 12, seed=step)
        # Loss = sum of activations x fixed random weights: its activation gradients.
        acts = jit_lookup(config, stacked, batch)
        weights = jax.tree.map(lambda a: jax.random.normal(jax.random.key(step + 7), a.shape), acts)
        stacked, slots = jit_update(config, stacked, slots, batch, weights, jnp.int32(step), dedup=dedup)
        grads = reference_grads(config, logical, batch, weights.as_dict())
        updates, new_state = dense_tx.update(grads, ref_state, logical)
        dense_new = optax.apply_updates(logical, updates)
        touched = touched_rows(config, batch)
        # Lazy semantics: the reference keeps untouched rows (and their slots) as they were.
        keep = lambda new, old, t: jnp.where(touched[t].reshape(-1, *[1] * (new.ndim - 1)), new, old)
        logical = {t: keep(dense_new[t], logical[t], t) for t in logical}
        if name == "adam":
            mu = {t: keep(new_state[0].mu[t], ref_state[0].mu[t], t) for t in logical}
            nu = {t: keep(new_state[0].nu[t], ref_state[0].nu[t], t) for t in logical}
            new_state = (new_state[0]._replace(mu=mu, nu=nu), *new_state[1:])
        ref_state = new_state

        got = unstack_tables(config, stacked)
        for t in logical:
            np.testing.assert_allclose(
                got[t], logical[t], rtol=2e-5, atol=2e-6, err_msg=f"{name} {t} step {step}"
            )


@pytest.mark.parametrize("name", list(CASES))
def test_untouched_rows_and_slots_are_bitwise_unchanged(name):
    config = make_config(CASES[name][0])
    stacked = init_tables(config, jax.random.key(1))
    slots = init_slots(config)
    batch = random_batch(config, 6, seed=11)
    acts = jit_lookup(config, stacked, batch)
    grads = jax.tree.map(lambda a: jnp.ones_like(a), acts)
    new_tables, new_slots = jit_update(config, stacked, slots, batch, grads, jnp.int32(0))
    touched = touched_rows(config, batch)
    before, after = unstack_tables(config, stacked), unstack_tables(config, new_tables)
    for t in before:
        np.testing.assert_array_equal(np.asarray(after[t])[~touched[t]], np.asarray(before[t])[~touched[t]])
        assert not np.array_equal(np.asarray(after[t])[touched[t]], np.asarray(before[t])[touched[t]])
    for group, group_slots in slots.items():
        for key, value in group_slots.items():
            changed = np.any(np.asarray(new_slots[group][key] != value).reshape(value.shape[0], -1), axis=1)
            assert changed.sum() <= sum(v.sum() for v in touched.values())


def test_duplicate_ids_are_summed_once():
    """Row-wise Adagrad is nonlinear in the gradient: applying per duplicate would differ."""
    config = make_config(SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=1.0))
    stacked = init_tables(config, jax.random.key(2))
    batch = random_batch(config, 32, seed=5)  # 32 bags over 50 rows: many duplicates
    acts = jit_lookup(config, stacked, batch)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.5), acts)
    marker = jit_update(config, stacked, init_slots(config), batch, grads, jnp.int32(0), dedup="marker")
    ordered = jit_update(config, stacked, init_slots(config), batch, grads, jnp.int32(0), dedup="sort")
    for a, b in zip(jax.tree.leaves(marker), jax.tree.leaves(ordered)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("accumulator", ["fresh", "reused"])
def test_optimizer_chunks_cover_every_unique_row(name, accumulator):
    """Chunks smaller than the unique count (and not dividing it) give the same result,
    and a reused accumulator is handed on clean from table to table (three tables with
    equal occurrence counts share one scan)."""
    optimizer = CASES[name][0]
    config = EmbeddingConfig(
        tables=tuple(TableSpec(name=f"t{i}", rows=30, dim=4, optimizer=optimizer) for i in range(3)),
        features=tuple(FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=3) for i in range(3)),
    )
    stacked = init_tables(config, jax.random.key(3))
    batch = random_batch(config, 24, seed=9)
    acts = jit_lookup(config, stacked, batch)
    grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(4), a.shape), acts)
    want = jit_update(config, stacked, init_slots(config), batch, grads, jnp.int32(0), accumulator="fresh")
    got = jit_update(
        config,
        stacked,
        init_slots(config),
        batch,
        grads,
        jnp.int32(0),
        optimizer_chunk=3,
        accumulator=accumulator,
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # other shapes: other roundings


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float16"])
def test_narrow_optimizer_state_tracks_float32(state_dtype):
    """Adam's state stored narrow stays narrow and follows the float32 run. Its v moves by
    (1 - beta2) = 0.1% a step, which bfloat16 rounding to nearest loses once v passes ~0.34
    (half a spacing is 0.2%): stochastic rounding keeps it unbiased."""
    steps, rows, dim = 1500, 64, 8

    def config_of(dtype):
        spec = SparseOptimizerSpec(kind="adam", learning_rate=1e-3, state_dtype=dtype)
        return EmbeddingConfig(
            tables=(TableSpec(name="t", rows=rows, dim=dim, optimizer=spec),),
            features=(FeatureSpec(name="f", table="t"),),
        )

    def run(dtype):
        config = config_of(dtype)
        batch = jax.tree.map(
            jnp.asarray, pack_batch(config, {"f": RaggedIds.from_lists([[i] for i in range(rows)])})
        )
        grads = jax.tree.map(jnp.ones_like, jit_lookup(config, init_tables(config, jax.random.key(0)), batch))

        @jax.jit
        def train(tables, slots):
            body = lambda step, c: sparse_update(config, *c, batch, grads, step, kernels="xla")  # noqa: E731
            return jax.lax.fori_loop(0, steps, body, (tables, slots))

        return train(init_tables(config, jax.random.key(0)), init_slots(config))

    want_tables, want_slots = run("float32")
    got_tables, got_slots = run(state_dtype)
    v_want = float(want_slots[next(iter(want_slots))]["v"][0, 0])
    np.testing.assert_allclose(v_want, 1 - 0.999**steps, rtol=1e-4)  # constant unit gradients
    for group, slots in got_slots.items():
        assert all(v.dtype == jnp.dtype(state_dtype) for v in slots.values())
        v = np.asarray(slots["v"], np.float32)
        assert abs(v.mean() - v_want) < 0.01, (v.mean(), v_want)  # unbiased over 512 elements
        np.testing.assert_allclose(np.asarray(slots["m"], np.float32), want_slots[group]["m"], rtol=2e-2)
        # Each element of v wanders by a few % around its mean (a step's rounding noise is
        # comparable to its signal and v remembers ~1000 steps), and so does the step size.
        moved = np.abs(
            np.asarray(want_tables[group])
            - np.asarray(init_tables(config_of(state_dtype), jax.random.key(0))[group])
        )
        error = np.abs(np.asarray(got_tables[group]) - np.asarray(want_tables[group]))
        assert error.max() < 0.05 * moved.min() and error.mean() < 0.01 * moved.mean()


def test_bad_state_dtype_names_the_choices():
    with pytest.raises(ValueError, match="state_dtype 'int8' is not one of"):
        SparseOptimizerSpec(state_dtype="int8")
    assert SparseOptimizerSpec(state_dtype=jnp.bfloat16).state_dtype == "bfloat16"


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_matches_optax_and_warms_up_linearly(decay):
    schedule = LRSchedule(warmup_steps=4, decay=decay, total_steps=20)
    steps = np.arange(25)
    got = np.asarray([schedule.scale(t) for t in steps])
    after = (
        optax.cosine_decay_schedule if decay == "cosine" else lambda v, n: optax.linear_schedule(v, 0, n)
    )(1.0, 16)
    want = np.where(steps < 4, (steps + 1) / 4, [after(max(t - 4, 0)) for t in steps])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert LRSchedule().constant and SparseOptimizerSpec().rate(jnp.int32(3)) == 0.01  # no schedule: a float


@pytest.mark.parametrize(
    "kernels, kind", [("xla", "adam"), ("cpu", "rowwise_adagrad"), ("pallas", "adagrad")]
)
def test_every_update_path_takes_the_scheduled_rate_at_run_time(kernels, kind):
    """Three updates under a warm-up and decay (the step, a traced operand, sets the rate)
    equal three updates at the fixed rates the schedule gives at those steps."""
    schedule = LRSchedule(warmup_steps=2, decay="cosine", total_steps=6)
    scheduled = make_config(SparseOptimizerSpec(kind=kind, learning_rate=0.05, schedule=schedule))
    update = jax.jit(sparse_update, static_argnums=0, static_argnames=("kernels",))
    tables = init_tables(scheduled, jax.random.key(0))
    slots = init_slots(scheduled)
    fixed_tables, fixed_slots = tables, slots
    for step in range(3):
        batch = random_batch(scheduled, 16, seed=step)
        acts = lookup(scheduled, tables, batch, kernels="xla")
        grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(step), a.shape), acts)
        tables, slots = update(scheduled, tables, slots, batch, grads, jnp.int32(step), kernels=kernels)
        rate = 0.05 * float(schedule.scale(step))
        fixed = make_config(SparseOptimizerSpec(kind=kind, learning_rate=rate))
        fixed_tables, fixed_slots = update(
            fixed, fixed_tables, fixed_slots, batch, grads, jnp.int32(step), kernels=kernels
        )
    for name in tables:
        np.testing.assert_allclose(tables[name], fixed_tables[name], rtol=2e-6, atol=1e-7)
