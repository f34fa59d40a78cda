"""The software-managed cache: its slot policies, hit rates beside Belady's optimum, and
cached training equal to uncached training bitwise (steps, predictions, checkpoints)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recsys
from recsys.cache import (
    CacheConfig,
    CachedTrainer,
    CacheOverflow,
    SlotMap,
    belady_hit_rate,
    parse_load_factors,
    policy_hit_rate,
)
from recsys.data import Dataset, train_batches
from recsys.synthetic import PlantedModel, SyntheticConfig, ZipfSampler

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = SyntheticConfig(num_sparse=3, rows=300, max_ids=3, num_dense=4)
BATCH = 32


# The slot map.


def test_lru_evicts_the_least_recently_used_row():
    slots = SlotMap("t", rows=10, capacity=3, policy="lru")
    for ids in ([1], [2], [3], [1]):
        slots.admit(np.array(ids))
    admitted = slots.admit(np.array([4]))
    assert admitted.evicted_ids.tolist() == [2] and admitted.hits == 0
    assert slots.slot_of[4] == admitted.fill_slots[0] and slots.slot_of[2] == -1


def test_lfu_keeps_the_most_used_row():
    slots = SlotMap("t", rows=10, capacity=2, policy="lfu")
    for ids in ([1], [1], [1], [2]):
        slots.admit(np.array(ids))
    assert slots.admit(np.array([3])).evicted_ids.tolist() == [2]


def test_lookahead_never_evicts_a_row_an_upcoming_batch_needs():
    slots = SlotMap("t", rows=10, capacity=3, policy="lookahead")
    for ids in ([1], [2], [3]):
        slots.admit(np.array(ids))
    # LRU would evict 1; the next batches need 1 soon and 2 later, so 3 goes.
    admitted = slots.admit(np.array([4]), upcoming=[np.array([1]), np.array([2])])
    assert admitted.evicted_ids.tolist() == [3]
    # With every row needed, the one needed furthest away goes.
    admitted = slots.admit(np.array([5]), upcoming=[np.array([1, 4]), np.array([2])])
    assert admitted.evicted_ids.tolist() == [2]


def next_uses_from_scratch(slots: SlotMap, upcoming) -> np.ndarray:
    """Each slot's distance to the nearest of `upcoming` using its row (len: none)."""
    out = np.full(slots.capacity, len(upcoming))
    for distance in range(len(upcoming) - 1, -1, -1):
        cached = slots.slot_of[upcoming[distance]]
        out[cached[cached >= 0]] = distance
    return out


def test_lookahead_slides_its_window_as_a_from_scratch_count_would():
    rows, depth = 500, 6
    trace = zipf_trace(rows, 60, 80, seed=3)
    slots = SlotMap("t", rows=rows, capacity=120, policy="lookahead")

    def check(ids, upcoming):
        slots.admit(ids, upcoming=upcoming)
        occupied = np.flatnonzero(slots.id_in >= 0)  # the admitted batch's rows included
        expected = next_uses_from_scratch(slots, upcoming)[occupied]
        # After admission the window's front is the first upcoming batch (numbered one up).
        base = slots.next_uses._entered - len(upcoming)
        got = np.minimum(slots.next_uses.slot_next[occupied] - base, len(upcoming))
        np.testing.assert_array_equal(got, expected)

    for i, ids in enumerate(trace):
        if i % 17 == 5:  # an evaluation batch between steps: the window starts anew
            check(trace[(i * 7) % len(trace)].copy(), ())
        check(ids, trace[i + 1 : i + 1 + depth])  # shrinks at the end of the stream


def test_pinned_slots_and_the_batch_own_rows_are_never_victims():
    slots = SlotMap("t", rows=10, capacity=3, policy="lru")
    first = slots.admit(np.array([1, 2]))
    second = slots.admit(np.array([3]), pinned=first.slots)
    assert second.evicted_ids.tolist() == [-1]  # the empty slot
    match = r"table 't': a batch looks up 3 distinct rows and the next batch, admitted already, holds 2 other slots"
    with pytest.raises(CacheOverflow, match=match):
        slots.admit(np.array([3, 4, 5]), pinned=first.slots)


def test_load_factors_parse_for_every_table_or_by_name():
    assert parse_load_factors("0.25", ["a", "b"]) == {"a": 0.25, "b": 0.25}
    assert parse_load_factors("b=0.5", ["a", "b"]) == {"b": 0.5}
    with pytest.raises(ValueError, match=r"names table 'c'; the tables are \['a', 'b'\]"):
        parse_load_factors("c=0.5", ["a", "b"])
    with pytest.raises(ValueError, match=r"for table 'a': 1.5 must be in \(0, 1\]"):
        parse_load_factors("a=1.5", ["a", "b"])


def zipf_trace(rows: int, batches: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sampler = ZipfSampler(rows, 1.05, rng)
    return [np.unique(sampler.sample(rng, size)) for _ in range(batches)]


def test_policies_stay_below_belady_and_lookahead_comes_close():
    rows = 20_000
    trace = zipf_trace(rows, 150, 600)
    for factor in (0.05, 0.2):
        capacity = int(factor * rows)
        optimum = belady_hit_rate(trace, rows, capacity)
        rates = {p: policy_hit_rate(trace, rows, capacity, p, depth=32) for p in ("lru", "lfu", "lookahead")}
        assert all(rate <= optimum + 1e-9 for rate in rates.values()), (factor, optimum, rates)
        assert rates["lookahead"] >= 0.95 * optimum, (factor, optimum, rates)
        assert rates["lookahead"] >= rates["lru"]


# Cached training against uncached.


class Tower(nnx.Module):
    """A dense tower over the dense features and the three pooled embeddings."""

    def __init__(self, config: recsys.EmbeddingConfig, *, rngs: nnx.Rngs):
        self.embedding = recsys.EmbeddingCollection(config, rngs=rngs)
        self.dense = nnx.Linear(SYNTHETIC.num_dense, 8, rngs=rngs)
        self.out = nnx.Linear(8 * 4, 1, rngs=rngs)
        self.features = [f.name for f in config.features]

    def __call__(self, dense, sparse):
        acts = self.embedding(sparse).stacked(self.features)  # [batch, features, 8]
        joined = jnp.concatenate([self.dense(dense), acts.reshape(acts.shape[0], -1)], axis=1)
        return self.out(jax.nn.relu(joined))[:, 0]


def embedding_config(
    kind: str, dtype: str = "float32", state_dtype: str = "float32"
) -> recsys.EmbeddingConfig:
    optimizer = recsys.SparseOptimizerSpec(kind=kind, learning_rate=0.05, state_dtype=state_dtype)
    config = SYNTHETIC.embedding_config(8, optimizer)
    return dataclasses.replace(
        config, tables=tuple(dataclasses.replace(t, dtype=dtype) for t in config.tables)
    )


def host_batches(config, count: int, seed: int = 0):
    planted = PlantedModel(SYNTHETIC, seed=0)
    data = Dataset.in_memory(planted.generate(BATCH * count, seed=seed).examples())
    out = []
    for examples, _ in train_batches(data, BATCH, seed=0):
        out.append(recsys.to_batch(config, examples))
        if len(out) == count:
            return out


def cached_trainer(config, factors, policy="lookahead", kernels="xla", **options):
    cache = CacheConfig(factors, policy=policy, prefetch_depth=4)
    build = lambda: Tower(config, rngs=nnx.Rngs(0))  # noqa: E731
    return CachedTrainer(build, optax.adam(0.01), cache, kernels=kernels, **options)


def run_uncached(config, batches, kernels="xla"):
    trainer = recsys.Trainer(Tower(config, rngs=nnx.Rngs(0)), optax.adam(0.01), kernels=kernels)
    state, losses = trainer.init_state(), []
    for batch in batches:
        state, loss = trainer.train_step(state, trainer.place_batch(batch))
        losses.append(np.asarray(loss))
    return trainer, state, losses


def run_cached(trainer, batches, state=None):
    state, losses = state or trainer.init_state(), []
    for batch, upcoming in trainer.lookahead(batches):
        state, loss = trainer.train_step(state, batch, upcoming)
        losses.append(np.asarray(loss))
    return state, losses


def assert_trees_equal(got, want):
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(want)
    assert got_tree == jax.tree.structure(want)
    for leaf, (path, value) in zip(got_leaves, want_leaves):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(value), err_msg=jax.tree_util.keystr(path))


def assert_cached_matches_uncached(config, batches, factors, policy="lookahead", kernels="xla"):
    """Trains `batches` uncached and cached at `factors`: the same losses, tables and
    slots, bit for bit. Returns (cached trainer, its state, plain trainer, its state)."""
    plain, plain_state, plain_losses = run_uncached(config, batches, kernels)
    cached = cached_trainer(config, factors, policy=policy, kernels=kernels)
    state, losses = run_cached(cached, batches)
    np.testing.assert_array_equal(losses, plain_losses)
    assert_trees_equal(cached.to_logical(state), plain.to_logical(plain_state))
    return cached, state, plain, plain_state


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_cached_training_equals_uncached_bitwise(kind):
    config = embedding_config(kind)
    batches = host_batches(config, 8)
    # t0 at 30% (evicting every step), t2 at 60%; t1 stays on the device.
    cached, state, plain, plain_state = assert_cached_matches_uncached(
        config, batches, {"t0": 0.3, "t2": 0.6}
    )
    metrics = cached.cache_metrics(state)
    assert 0 < metrics["cache_hit_rates"]["t0"] < metrics["cache_hit_rates"]["t2"] < 1
    assert metrics["cache_device_to_host_bytes_per_step"] > 0
    # Predictions go through the cache too.
    batch = batches[0]
    np.testing.assert_array_equal(
        cached.predict(state, batch.dense, batch.sparse),
        plain.predict(plain_state, jnp.asarray(batch.dense), jax.tree.map(jnp.asarray, batch.sparse)),
    )


def check_narrow_tables_bitwise(kind: str, state_dtype: str, kernels: str = "xla", steps: int = 6) -> None:
    config = embedding_config(kind, "bfloat16", state_dtype)
    assert_cached_matches_uncached(
        config, host_batches(config, steps), {"t0": 0.3, "t2": 0.6}, kernels=kernels
    )


_NARROW_RUN = """
from tests import test_cache
for kind, state_dtype in (("rowwise_adagrad", "float32"), ("adam", "bfloat16")):
    test_cache.check_narrow_tables_bitwise(kind, state_dtype)
# The fused Pallas update (interpreted here) takes the slots' rounding keys too.
test_cache.check_narrow_tables_bitwise("rowwise_adagrad", "float32", kernels="pallas", steps=4)
"""


def run_at_default_optimization(code: str) -> None:
    """Runs `code` in a fresh process at XLA's default optimization, as users run: the
    suite's unoptimized LLVM (tests/conftest.py) may compile a row's float math
    differently in a cached and an uncached program, one bfloat16 step apart in a rare
    element."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_bfloat16_tables_round_alike_cached_and_uncached():
    """Stochastic rounding draws its bits from the row an id names, never from its slot."""
    run_at_default_optimization(_NARROW_RUN)


def test_lru_trains_exactly():
    """LRU evicts rows the next batches need, so written-back rows are fetched again."""
    config = embedding_config("rowwise_adagrad")
    assert_cached_matches_uncached(
        config, host_batches(config, 6), {"t0": 0.3, "t1": 0.3, "t2": 0.3}, policy="lru"
    )


def test_a_checkpoint_of_a_cached_run_restores_with_or_without_a_cache(tmp_path):
    config = embedding_config("adam")
    batches = host_batches(config, 8)
    plain, plain_state, plain_losses = run_uncached(config, batches)
    cached = cached_trainer(config, {"t0": 0.3, "t1": 0.5})
    state, _ = run_cached(cached, batches[:4])
    checkpoints = recsys.Checkpointer(str(tmp_path))
    checkpoints.save(4, cached, state, {})
    checkpoints.wait()
    # Resumed with a cache (empty at first) and without one: the uninterrupted result.
    fresh = cached_trainer(config, {"t0": 0.3, "t1": 0.5})
    resumed, _ = checkpoints.restore(fresh, fresh.init_state())
    resumed, losses = run_cached(fresh, batches[4:], resumed)
    np.testing.assert_array_equal(losses, plain_losses[4:])
    assert_trees_equal(fresh.to_logical(resumed), plain.to_logical(plain_state))
    uncached = recsys.Trainer(Tower(config, rngs=nnx.Rngs(0)), optax.adam(0.01), kernels="xla")
    restored, _ = checkpoints.restore(uncached, uncached.init_state())
    for batch in batches[4:]:
        restored, _ = uncached.train_step(restored, uncached.place_batch(batch))
    assert_trees_equal(uncached.to_logical(restored), plain.to_logical(plain_state))
    checkpoints.close()


def test_a_batch_wider_than_its_cache_names_the_table():
    config = embedding_config("sgd")
    cached = cached_trainer(config, {"t1": 0.02})  # 6 slots
    batch = host_batches(config, 1)[0]
    with pytest.raises(
        CacheOverflow, match=r"table 't1': a batch looks up \d+ distinct rows, but the cache has 6 slots"
    ):
        cached.train_step(cached.init_state(), batch)


def test_the_announced_next_batch_must_be_the_one_trained():
    config = embedding_config("sgd")
    batches = host_batches(config, 3)
    cached = cached_trainer(config, {"t0": 0.5})
    state, _ = cached.train_step(cached.init_state(), batches[0], [cached.unique_ids(batches[1])])
    with pytest.raises(ValueError, match="table 't0': this batch's ids differ from those announced"):
        cached.train_step(state, batches[2])


# The CLI.

CLI = ["--train-samples", "2048", "--eval-samples", "512", "--batch-size", "64", "--num-tables", "3"]
CLI += ["--rows", "400", "--steps", "12", "--no-progress", "--kernels", "xla"]


def test_the_cli_trains_cached_tables_exactly_and_reports_the_cache(tmp_path):
    from recsys import train

    results = {}
    for name, extra in {"device": [], "cached": ["--cache-load-factor", "t0=0.4,t2=0.6"]}.items():
        out = tmp_path / f"{name}.json"
        assert train.main([*CLI, *extra, "--metrics-out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    device, cached = results["device"], results["cached"]
    for key in ("auc", "logloss", "train_loss"):
        assert cached[key] == device[key], key
    assert device["cache_hit_rate"] is None
    assert 0 < cached["cache_hit_rates"]["t0"] < 1 and set(cached["cache_hit_rates"]) == {"t0", "t2"}
    assert cached["cache_host_to_device_bytes_per_step"] > 0
    assert cached["cache_placement"]["t0"] == {"cached_rows": 160, "rows": 400}
    assert cached["cache_placement"]["t1"] == {"device_rows": 400, "rows": 400}


def test_cache_flags_are_checked(capsys):
    from tests.conftest import cli_error

    line = cli_error(capsys, [*CLI, "--cache-load-factor", "t9=0.5"])
    assert "--cache-load-factor names table 't9'" in line
    mesh = ["--devices", "8", "--mesh", "host=2,device=4"]
    line = cli_error(capsys, [*CLI, *mesh, "--device-memory", "1MB"])
    assert "--device-memory plans the tables for that memory: add --sharding auto" in line
    line = cli_error(
        capsys, [*CLI, *mesh, "--sharding", "auto", "--device-memory", "1MB", "--cache-load-factor", "0.5"]
    )
    assert "--device-memory lets the planner choose the cached tables" in line
    line = cli_error(capsys, [*CLI, *mesh, "--sharding", "auto", "--device-memory", "lots"])
    assert "--device-memory: not a byte count" in line
    line = cli_error(capsys, [*CLI, "--cache-load-factor", "0.5", "--pipeline", "semi_sync"])
    assert "--pipeline semi_sync looks batches up ahead of the cache's admission" in line


def test_a_built_module_or_a_builder_start_alike():
    config = embedding_config("adagrad")
    factors = {"t0": 0.3}
    from_builder = cached_trainer(config, factors)
    cache = CacheConfig(factors, prefetch_depth=4)
    from_module = CachedTrainer(Tower(config, rngs=nnx.Rngs(0)), optax.adam(0.01), cache, kernels="xla")
    assert_trees_equal(
        from_module.to_logical(from_module.init_state()), from_builder.to_logical(from_builder.init_state())
    )


def test_precompiled_exchanges_serve_every_step():
    """`precompile` compiles the exchange of each fill size once; steps compile none."""
    config = embedding_config("adagrad")
    batches = host_batches(config, 6)
    trainer = cached_trainer(config, {"t0": 0.3, "t2": 0.3})
    state = trainer.init_state()
    # A group's fills per step are at most its tables' distinct ids: 2 x 32 samples x 3.
    trainer.precompile(state, 192)
    compiled = (trainer._read._cache_size(), trainer._write._cache_size())
    assert compiled == (5, 5)  # fill sizes 16, 32, 64, 128, 256
    run_cached(trainer, batches, state)
    assert (trainer._read._cache_size(), trainer._write._cache_size()) == compiled
