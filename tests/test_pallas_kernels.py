"""The Pallas kernels, both flavours, in interpret mode against their plain-jnp references.

Every kernel also lowers, without hardware, for CUDA (Triton) and TPU (Mosaic): the test
catches what interpret mode cannot (Triton's power-of-two loads, Mosaic's tiling rules).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.embedding_bag import (
    BagBlockSizes,
    bag_coefficients,
    bag_lengths,
    embedding_bag,
    embedding_bag_reference,
    kernel_gpu,
    kernel_tpu,
    stack_tables,
)
from pallas_kernels.fused_update import (
    KINDS,
    RowOptimizer,
    Segments,
    UpdateBlockSizes,
    build_segments,
    fused_update,
    fused_update_reference,
    random_bits,
    stochastic_round,
)
from pallas_kernels.fused_update import kernel_gpu as update_gpu
from pallas_kernels.fused_update import kernel_tpu as update_tpu

FLAVOURS = ("gpu", "tpu")


def on(flavour):
    """Compiled where the backend runs this flavour (`benchmarks/gpu_check.sh` on a GPU),
    interpreted everywhere else."""
    return dict(flavour=flavour, interpret=jax.default_backend() != flavour)


DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Inputs are rounded to the table dtype before the reference runs, so only the float32
# accumulation order differs.
TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 1e-6, jnp.float16: 1e-6}


def bag_inputs(rng, rows=23, dim=16, features=3, batch=21, bag=5, dtype=jnp.float32):
    """A small stacked table (values encode the row) and bags with repeats, empty bags,
    padding, and per-feature pooling: feature 0 mean, 1 weighted sum, 2 plain sum."""
    table = (jnp.arange(rows)[:, None] + rng.uniform(size=(rows, dim)) / 4).astype(dtype)
    ids = rng.integers(0, 6, (features, batch, bag))  # a few hot rows: many repeats
    ids[:, ::4] = rng.integers(0, rows, (features, -(-batch // 4), bag))
    lengths = rng.integers(0, bag + 1, (features, batch))
    lengths[:, 0] = 0  # an empty bag in every feature
    lengths[:, 1] = bag  # a full one
    weights = np.ones((features, batch, bag), np.float32)
    weights[1] = rng.uniform(0.5, 2.0, (batch, bag))
    coef = bag_coefficients(jnp.asarray(lengths), bag, jnp.asarray(weights), mean=[True, False, False])
    return table, jnp.asarray(ids, jnp.int32), coef, jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_embedding_bag_matches_reference(flavour, dtype):
    rng = np.random.default_rng(0)
    table, ids, coef, lengths = bag_inputs(rng, dtype=dtype)
    # Batch 21 is not a multiple of the 8-bag block; a 40-id prefetch budget splits the
    # TPU flavour into several calls.
    sizes = BagBlockSizes(bags_per_step=8, max_prefetch_ids=40)
    for pooled in (True, False):
        got = embedding_bag(table, ids, coef, lengths, pooled=pooled, block_sizes=sizes, **on(flavour))
        want = embedding_bag_reference(table, ids, coef, pooled=pooled)
        assert got.dtype == jnp.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    # The reference itself, by hand: bag (feature 0, sample 1) is full and mean-pooled.
    full = np.asarray(table, np.float32)[np.asarray(ids[0, 1])].mean(axis=0)
    np.testing.assert_allclose(want[1, 0].sum(axis=0), full, rtol=1e-6)
    assert not np.asarray(got[0]).any()  # empty bags are zero


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_embedding_bag_never_reads_padding(flavour):
    rng = np.random.default_rng(1)
    table, ids, coef, lengths = bag_inputs(rng)
    poisoned = table.at[5].set(jnp.nan)
    unused = jnp.where(coef == 0, 5, jnp.where(ids == 5, 4, ids))  # row 5 only on padding
    got = embedding_bag(poisoned, unused, coef, **on(flavour))  # lengths from coef
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, embedding_bag_reference(table, unused, coef), rtol=1e-6)


def test_embedding_bag_gradients_match_reference():
    rng = np.random.default_rng(2)
    table, ids, coef, lengths = bag_inputs(rng)

    def loss(fn):
        return lambda t, c: jnp.sum(jnp.sin(fn(t, c)))

    kernel = jax.grad(loss(lambda t, c: embedding_bag(t, ids, c, lengths, flavour="gpu")), (0, 1))
    reference = jax.grad(loss(lambda t, c: embedding_bag_reference(t, ids, c)), (0, 1))
    for got, want in zip(kernel(table, coef), reference(table, coef)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stack_tables_pads_dims_and_offsets_rows():
    a, b = jnp.ones((10, 4)), 2 * jnp.ones((6, 8))
    stacked, offsets = stack_tables([a, b])
    assert stacked.shape == (16, 8) and list(offsets) == [0, 10]
    assert not np.asarray(stacked[:10, 4:]).any() and (np.asarray(stacked[10:]) == 2).all()
    ids = jnp.asarray([[[3]], [[2 + offsets[1]]]], jnp.int32)  # feature 0 -> a, 1 -> b
    out = embedding_bag(stacked, ids, jnp.ones((2, 1, 1)), flavour="gpu")
    np.testing.assert_array_equal(out[0, :, :4], [[1] * 4, [2] * 4])
    with pytest.raises(ValueError, match="narrower than the widest"):
        stack_tables([a, b], dim=4)


def test_bag_lengths_from_coefficients():
    coef = jnp.asarray([[[1.0, 0.0, 2.0, 0.0], [0.0] * 4, [1.0] * 4]])
    np.testing.assert_array_equal(bag_lengths(coef), [[3, 0, 4]])


def test_embedding_bag_rejects_bad_input():
    table, ids, coef = jnp.ones((8, 16)), jnp.zeros((2, 4, 3), jnp.int32), jnp.ones((2, 4, 3))
    with pytest.raises(ValueError, match="ids must be \\[features, batch, bag\\]"):
        embedding_bag(table, ids[0], coef[0])
    with pytest.raises(ValueError, match="coef shape"):
        embedding_bag(table, ids, coef[:, :2])
    with pytest.raises(ValueError, match="table dtype"):
        embedding_bag(table.astype(jnp.int32), ids, coef)
    with pytest.raises(ValueError, match="power-of-two dim"):
        embedding_bag(jnp.ones((8, 12)), ids, coef, flavour="gpu")
    with pytest.raises(ValueError, match="flavour must be one of"):
        embedding_bag(table, ids, coef, flavour="cuda")
    elsewhere = "gpu" if jax.default_backend() == "tpu" else "tpu"
    with pytest.raises(ValueError, match=f"the compiled '{elsewhere}' flavour needs a {elsewhere.upper()}"):
        embedding_bag(table, ids, coef, flavour=elsewhere, interpret=False)
    with pytest.raises(ValueError, match="bags_per_step must be a power of two >= 8"):
        BagBlockSizes(bags_per_step=12)
    with pytest.raises(ValueError, match="num_warps must be a positive int"):
        BagBlockSizes(num_warps=0)


def update_inputs(rng, kind, dtype, rows=30, dim=16, n=70, m=20, state_dtype=jnp.float32):
    optimizer = RowOptimizer(kind=kind, learning_rate=0.05, weight_decay=0.01, eps=1e-6)
    table = jnp.asarray(rng.normal(size=(rows, dim)), dtype)
    shape = (rows,) if kind == "rowwise_adagrad" else (rows, dim)
    state = {k: jnp.asarray(rng.uniform(size=shape), state_dtype) for k in optimizer.state_names()}
    ids = rng.integers(0, 8, n)  # hot rows: many duplicates
    ids[::3] = rng.integers(0, rows, len(ids[::3]))
    ids[::7] = -1  # skipped occurrences
    ids[5] = rows + 3  # outside the table: skipped too
    grads = rng.normal(size=(m, dim)).astype(np.float32)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(rng.normal(size=n), jnp.float32))
    args += (jnp.asarray(rng.integers(0, m, n), jnp.int32), jnp.asarray(grads))
    return optimizer, table, state, args


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fused_update_matches_reference(flavour, kind):
    rng = np.random.default_rng(3)
    # A 4-occurrence window, fewer than the hottest rows have: several windows per row.
    sizes = UpdateBlockSizes(rows_per_step=8, window=4)
    # float32, and one narrow type per flavour for the table and the optimizer state (both
    # flavours share the rounding code): CI time.
    for dtype in (jnp.float32, jnp.float16 if flavour == "gpu" else jnp.bfloat16):
        optimizer, table, state, args = update_inputs(rng, kind, dtype, state_dtype=dtype)
        touched = np.unique([i for i in np.asarray(args[0]) if 0 <= i < table.shape[0]])
        # A scheduled rate: the kernel's learning rate is a runtime scalar.
        options = dict(optimizer=optimizer, step=4, seed=11, lr_scale=jnp.float32(0.25))
        got_table, got_state = fused_update(table, state, *args, **options, **on(flavour), block_sizes=sizes)
        want_table, want_state = fused_update_reference(table, state, *args, **options)
        assert got_table.dtype == table.dtype
        # Narrow tables: the stochastic rounding bits agree, so at most one step of the
        # narrow type apart where float32 rounding differs just at a rounding boundary.
        ulp = 0 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
        np.testing.assert_allclose(
            np.asarray(got_table, np.float32), np.asarray(want_table, np.float32), rtol=ulp + 2e-6, atol=1e-6
        )
        for k in state:
            assert got_state[k].dtype == state[k].dtype
            np.testing.assert_allclose(
                np.asarray(got_state[k], np.float32),
                np.asarray(want_state[k], np.float32),
                rtol=ulp + 2e-6,
                atol=1e-7,
            )
            if dtype != jnp.float32:  # stochastically rounded, not to nearest
                nearest = np.asarray(
                    fused_update_reference(table, state, *args, **options, stochastic_rounding=False)[1][k],
                    np.float32,
                )
                assert (np.asarray(got_state[k], np.float32) != nearest).any()
        untouched = np.setdiff1d(np.arange(table.shape[0]), touched)
        np.testing.assert_array_equal(np.asarray(got_table)[untouched], np.asarray(table)[untouched])
        assert (np.asarray(got_table, np.float32)[touched] != np.asarray(table, np.float32)[touched]).any()
        again, _ = fused_update(table, state, *args, **options, **on(flavour), block_sizes=sizes)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(got_table))  # deterministic


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fused_update_rounds_keyed_rows_by_their_keys(flavour):
    """A row with a key draws the rounding bits of the keyed row (a cache's slots round
    as the rows they hold): the same result as the reference with the keys, and another
    than without them."""
    rng = np.random.default_rng(5)
    dtype = jnp.float16 if flavour == "gpu" else jnp.bfloat16
    optimizer, table, state, args = update_inputs(rng, "adam", dtype, state_dtype=dtype)
    keys = jnp.asarray(rng.permutation(1000)[: table.shape[0]], jnp.int32)
    options = dict(optimizer=optimizer, step=2, seed=7)
    sizes = UpdateBlockSizes(rows_per_step=8, window=4)
    got, got_state = fused_update(
        table, state, *args, **options, **on(flavour), block_sizes=sizes, row_keys=keys
    )
    want, want_state = fused_update_reference(table, state, *args, **options, row_keys=keys)
    ulp = float(jnp.finfo(dtype).eps)
    for g, w in [(got, want), *((got_state[k], want_state[k]) for k in state)]:
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=ulp + 2e-6, atol=1e-6
        )
    unkeyed, _ = fused_update_reference(table, state, *args, **options)
    assert (np.asarray(want, np.float32) != np.asarray(unkeyed, np.float32)).any()


def test_fused_update_sums_duplicates_once():
    """SGD without decay on one row seen three times: w - lr * sum(coef * grad), once."""
    optimizer = RowOptimizer(kind="sgd", learning_rate=0.5)
    table = jnp.zeros((4, 16))
    ids = jnp.asarray([2, 2, -1, 2], jnp.int32)
    coef = jnp.asarray([1.0, 2.0, 5.0, 3.0])
    src = jnp.asarray([0, 1, 1, 0], jnp.int32)
    grads = jnp.stack([jnp.ones(16), 10 * jnp.ones(16)])
    for flavour in FLAVOURS:
        new, _ = fused_update(table, {}, ids, coef, src, grads, optimizer=optimizer, **on(flavour))
        np.testing.assert_allclose(new[2], -0.5 * (1 + 20 + 3) * np.ones(16))
        assert not np.asarray(new)[[0, 1, 3]].any()


def test_fused_update_rejects_bad_input():
    optimizer = RowOptimizer(kind="adam", learning_rate=0.1)
    table, n = jnp.zeros((8, 16)), jnp.zeros((3,), jnp.int32)
    grads, state = jnp.zeros((2, 16)), {"m": jnp.zeros((8, 16)), "v": jnp.zeros((8, 16))}
    with pytest.raises(ValueError, match="adam needs state \\['m', 'v'\\]"):
        fused_update(table, {"acc": jnp.zeros(8)}, n, n * 1.0, n, grads, optimizer=optimizer)
    with pytest.raises(ValueError, match="state 'v' must have shape \\(8, 16\\)"):
        fused_update(table, {**state, "v": jnp.zeros(8)}, n, n * 1.0, n, grads, optimizer=optimizer)
    with pytest.raises(ValueError, match="grads must be \\[m, 16\\]"):
        fused_update(table, state, n, n * 1.0, n, grads[:, :4], optimizer=optimizer)
    with pytest.raises(ValueError, match="optimizer kind must be one of"):
        RowOptimizer(kind="lamb", learning_rate=0.1)
    with pytest.raises(ValueError, match="rows_per_step must be a multiple of 8"):
        UpdateBlockSizes(rows_per_step=4)


def test_segments_worked_example():
    s = build_segments(
        jnp.asarray([5, 2, 5, -1]),
        jnp.asarray([1.0, 2.0, 3.0, 4.0]),
        jnp.asarray([0, 1, 2, 3]),
        rows=8,
        pad=2,
    )
    np.testing.assert_array_equal(s.rows[:2], [2, 5])
    np.testing.assert_array_equal(s.starts, [0, 1, 3, 3, 3])
    np.testing.assert_array_equal(s.src, [1, 0, 2, 3, 0, 0])
    np.testing.assert_array_equal(s.coef, [2.0, 1.0, 3.0, 0.0, 0.0, 0.0])  # skipped: coef 0
    assert int(s.count[0]) == 2


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16), ids=lambda d: jnp.dtype(d).name)
def test_stochastic_round_brackets_and_is_unbiased(dtype):
    rng = np.random.default_rng(4)
    # Normal values, float16 subnormals and exactly representable values.
    x = np.concatenate([rng.normal(size=64), rng.normal(size=32) * 1e-6, [1.0, -0.5, 0.0]]).astype(np.float32)
    draws = 4096
    bits = random_bits(jnp.int32(9), jnp.arange(draws)[:, None], jnp.arange(x.size)[None, :])
    rounded = np.asarray(stochastic_round(jnp.broadcast_to(x, bits.shape), bits, dtype), np.float32)
    near = jnp.asarray(x).astype(dtype)
    up = jnp.nextafter(near, jnp.asarray(np.inf, dtype))
    down = jnp.nextafter(near, jnp.asarray(-np.inf, dtype))
    nearest = np.asarray(near, np.float32)
    lo = np.where(nearest > x, np.asarray(down, np.float32), nearest)  # the bracketing pair
    hi = np.where(nearest < x, np.asarray(up, np.float32), nearest)
    assert ((rounded == lo) | (rounded == hi)).all()
    exact = x == nearest
    # Unbiased: the mean of 4096 draws is within 4 standard errors of x.
    error = np.abs(rounded.mean(axis=0) - x)
    assert (error <= 4 * (hi - lo) / np.sqrt(draws) + 1e-12).all(), error.max()
    # Not round-to-nearest in disguise: inexact values leave their nearest neighbour about
    # a quarter of the time (the mean distance to the far neighbour, as a fraction).
    inexact = ~exact & (x != 0)
    assert 0.15 < (rounded[:, inexact] != nearest[inexact]).mean() < 0.35
    special = jnp.asarray([np.inf, -np.inf, np.nan], jnp.float32)
    out = np.asarray(stochastic_round(special, jnp.zeros(3, jnp.int32) - 1, dtype), np.float32)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2])


def test_random_bits_are_deterministic_and_seeded():
    rows, columns = jnp.arange(64)[:, None], jnp.arange(16)[None, :]
    a = np.asarray(random_bits(jnp.int32(1), rows, columns))
    np.testing.assert_array_equal(a, random_bits(jnp.int32(1), rows, columns))
    assert (a != np.asarray(random_bits(jnp.int32(2), rows, columns))).mean() > 0.99
    ones = np.unpackbits(a.view(np.uint8)).mean()
    assert 0.48 < ones < 0.52  # balanced bits


def _lowered(fn, *shapes, platform):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ("cuda", "tpu"))
def test_kernels_lower_for_gpu_and_tpu(platform):
    """Compiled (not interpreted) lowering: Triton IR for CUDA, Mosaic for TPU."""
    S = jax.ShapeDtypeStruct
    rows, dim, features, batch, bag, n = 1000, 128, 3, 64, 4, 256
    table = S((rows, dim), jnp.bfloat16)
    for pooled in (True, False):
        if platform == "cuda":
            text = _lowered(
                lambda *a: kernel_gpu.bag_call(
                    *a, pooled=pooled, bags_per_step=16, num_warps=4, interpret=False
                ),
                table,
                S((features, bag, batch), jnp.int32),
                S((features, batch), jnp.int32),
                S((features, bag, batch), jnp.float32),
                platform=platform,
            )
        else:
            text = _lowered(
                lambda *a: kernel_tpu.bag_call(*a, pooled=pooled, bags_per_step=16, interpret=False),
                table,
                S((features * batch, bag), jnp.int32),
                S((features * batch,), jnp.int32),
                S((features * batch, bag), jnp.float32),
                platform=platform,
            )
        assert "triton" in text.lower() or "mosaic" in text.lower() or "tpu_custom_call" in text
    window = 16
    segments = Segments(
        S((n,), jnp.int32),
        S((n + 1,), jnp.int32),
        S((n + window,), jnp.int32),
        S((n + window,), jnp.float32),
        S((1,), jnp.int32),
    )
    for kind, state_dtype in itertools.product(KINDS, (jnp.float32, jnp.bfloat16)):
        optimizer = RowOptimizer(kind=kind, learning_rate=0.1)
        width = optimizer.state_width(dim)
        state = tuple(S((rows, width), state_dtype) for _ in optimizer.state_names())
        narrow = state_dtype != jnp.float32
        common = dict(optimizer=optimizer, rounding=True, state_rounding=narrow, interpret=False)
        if platform == "cuda":
            call = lambda *a: update_gpu.update_call(*a, num_warps=1, **common)
        else:
            call = lambda *a: update_tpu.update_call(*a, rows_per_step=8, window=window, **common)
        _lowered(
            call,
            table,
            state,
            segments,
            S((n,), jnp.int32),
            S((n, dim), jnp.float32),
            S((1,), jnp.int32),
            S((3,), jnp.float32),
            platform=platform,
        )


@pytest.mark.parametrize("platform", ("cuda", "tpu"))
def test_update_kernel_lowers_inside_shard_map(platform):
    """The sharded train step runs the fused update on each owner's block inside
    `jax.shard_map`, whose varying-axes check needs every kernel output typed."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    optimizer = RowOptimizer(kind="adam", learning_rate=0.1)
    rows, dim, n = 64, 16, 32

    def body(table, m, v, ids, grads):
        src = jnp.arange(n, dtype=jnp.int32)
        segments = build_segments(ids[0], jnp.ones(n), src, rows, pad=16 if platform == "tpu" else 0)
        common = dict(optimizer=optimizer, rounding=True, state_rounding=False, interpret=False)
        seed, keys = jnp.zeros((1,), jnp.int32), segments.rows
        operands = (table[0], (m[0], v[0]), segments, keys, grads[0], seed, jnp.ones(2))
        if platform == "cuda":
            table, (m, v) = update_gpu.update_call(*operands, num_warps=1, **common)
        else:
            table, (m, v) = update_tpu.update_call(*operands, rows_per_step=8, window=16, **common)
        return table[None], m[None], v[None]

    S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("x")))  # noqa: E731
    state = S((2, rows, dim), jnp.float32)
    args = (S((2, rows, dim), jnp.bfloat16), state, state, S((2, n), jnp.int32), S((2, n, dim), jnp.float32))
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 5, out_specs=(P("x"),) * 3))
    text = step.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert "triton" in text.lower() or "tpu_custom_call" in text
