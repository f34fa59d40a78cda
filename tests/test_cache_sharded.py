"""The cache on a mesh: each owner caches its block, and cached training equals the
uncached sharded run bitwise for every strategy, fp32 and bfloat16 tables."""

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mesh import ShardingPlan, make_mesh, mesh_spec, plan_for_strategy
from recsys.cache import CacheConfig, ShardedCachedTrainer
from recsys.training.sharded import ShardedTrainer
from tests.test_cache import (
    Tower,
    assert_trees_equal,
    embedding_config,
    host_batches,
    run_at_default_optimization,
)


def mixed_plan(config, mesh, strategies) -> ShardingPlan:
    spec = mesh_spec(mesh)
    return ShardingPlan(
        {
            t.name: plan_for_strategy(config.tables, spec, s).tables[t.name]
            for t, s in zip(config.tables, strategies)
        },
        spec,
    )


def run_plain(config, plan, mesh, batches):
    trainer = ShardedTrainer(Tower(config, rngs=nnx.Rngs(0)), optax.adam(0.01), plan, mesh, kernels="xla")
    state, losses = trainer.init_state(), []
    for batch in batches:
        state, loss = trainer.train_step(state, trainer.place_batch(batch))
        losses.append(np.asarray(loss))
    return trainer, state, losses


def run_cached(config, plan, mesh, batches, factors):
    build = lambda: Tower(config, rngs=nnx.Rngs(0))  # noqa: E731
    cache = CacheConfig(factors, prefetch_depth=4)
    trainer = ShardedCachedTrainer(build, optax.adam(0.01), cache, plan, mesh, kernels="xla")
    state, losses = trainer.init_state(), []
    for batch, upcoming in trainer.lookahead(batches):
        state, loss = trainer.train_step(state, batch, upcoming)
        losses.append(np.asarray(loss))
    return trainer, state, losses


def assert_sharded_cached_matches(config, strategies, factors, steps=6):
    mesh = make_mesh("host=2,device=4")
    plan = mixed_plan(config, mesh, strategies)
    batches = host_batches(config, steps)
    plain, plain_state, plain_losses = run_plain(config, plan, mesh, batches)
    cached, state, losses = run_cached(config, plan, mesh, batches, factors)
    np.testing.assert_array_equal(losses, plain_losses)
    assert_trees_equal(cached.to_logical(state), jax.device_get(plain.to_logical(plain_state)))
    return cached, state


ROW_SHARDED = ("row_wise", "table_row_wise", "grid")
WHOLE_ROWS = ("table_wise", "column_wise", "data_parallel")
FACTORS = {"t0": 0.6, "t1": 0.6, "t2": 0.6}


@pytest.mark.parametrize(
    "strategies, kind, dtype",
    [
        (ROW_SHARDED, "rowwise_adagrad", "float32"),
        (WHOLE_ROWS, "adam", "float32"),
    ],
)
def test_sharded_cached_training_equals_uncached_bitwise(strategies, kind, dtype):
    cached, state = assert_sharded_cached_matches(embedding_config(kind, dtype), strategies, FACTORS)
    rates = cached.cache_metrics(state)["cache_hit_rates"]
    assert all(0 < r < 1 for r in rates.values()), rates


_NARROW_RUN = """
from tests import test_cache, test_cache_sharded as t
for strategies in (t.ROW_SHARDED, t.WHOLE_ROWS):
    t.assert_sharded_cached_matches(test_cache.embedding_config("rowwise_adagrad", "bfloat16"), strategies, t.FACTORS)
# float32 values with bfloat16 optimizer state round too.
t.assert_sharded_cached_matches(test_cache.embedding_config("adam", "float32", "bfloat16"), t.ROW_SHARDED, t.FACTORS)
"""


def test_sharded_bfloat16_tables_round_alike_cached_and_uncached():
    """A slot rounds with the bits of the row it holds on that owner (`ROW_KEY`)."""
    run_at_default_optimization(_NARROW_RUN)


def test_each_owner_caches_its_own_block():
    config = embedding_config("sgd")
    mesh = make_mesh("host=2,device=4")
    cache = CacheConfig({"t0": 0.5, "t1": 0.5})
    plan = mixed_plan(config, mesh, ("row_wise", "table_row_wise", "table_wise"))
    trainer = ShardedCachedTrainer(lambda: Tower(config, rngs=nnx.Rngs(0)), optax.sgd(0.1), cache, plan, mesh)
    # 300 rows over 8 devices: blocks of 38 (the last 34), each with 19 slots on its owner.
    t0 = trainer.blocks["t0"]
    assert [(b.rows, b.slot_start, b.capacity) for b in t0[:2]] == [((0, 38), 0, 19), ((38, 76), 19, 19)]
    assert t0[-1].rows == (266, 300) and t0[-1].capacity == 19
    owners = {(s.device, s.rows) for s in trainer.trainer.plan.tables["t0"].shards}
    assert owners == {(d, (19 * d, 19 * d + 19)) for d in range(8)}
    # table_row_wise: 4 blocks of 75 rows on one host's devices, and their slots with them.
    devices = sorted(s.device for s in plan.tables["t1"].shards)
    assert sorted(s.device for s in trainer.trainer.plan.tables["t1"].shards) == devices
    assert len(devices) == 4 and len({d // 4 for d in devices}) == 1
    assert trainer.cached_rows("t1") == 4 * 38


def test_a_sharded_cached_checkpoint_resumes_exactly():
    """Train 3 steps cached, save (the uncached tree), restore into a fresh cached trainer
    and train 3 more: the same as 6 uncached steps."""
    config = embedding_config("adagrad")
    mesh = make_mesh("host=2,device=4")
    plan = mixed_plan(config, mesh, ROW_SHARDED)
    batches = host_batches(config, 6)
    plain, plain_state, _ = run_plain(config, plan, mesh, batches)
    first, state, _ = run_cached(config, plan, mesh, batches[:3], FACTORS)
    tree = first.to_logical(state)
    second, fresh, _ = run_cached(config, plan, mesh, [], FACTORS)
    resumed = second.from_logical(fresh, tree)
    for batch, upcoming in second.lookahead(batches[3:]):
        resumed, _ = second.train_step(resumed, batch, upcoming)
    assert_trees_equal(second.to_logical(resumed), jax.device_get(plain.to_logical(plain_state)))


MESH = ["--devices", "8", "--mesh", "host=2,device=4"]


def test_the_cli_caches_sharded_tables_exactly(tmp_path):
    from recsys import train
    from tests.test_cache import CLI

    results = {}
    for name, extra in {"device": [], "cached": ["--cache-load-factor", "t0=0.5,t2=0.6"]}.items():
        out = tmp_path / f"{name}.json"
        assert (
            train.main([*CLI, *MESH, "--sharding", "table_row_wise", *extra, "--metrics-out", str(out)]) == 0
        )
        results[name] = json.loads(out.read_text())
    device, cached = results["device"], results["cached"]
    for key in ("auc", "logloss", "train_loss"):
        assert cached[key] == device[key], key
    assert set(cached["cache_hit_rates"]) == {"t0", "t2"} and cached["plan"] == device["plan"]
    # 400 rows over 4 devices: 4 blocks of 100, each caching 50.
    assert cached["cache_placement"]["t0"] == {"cached_rows": 200, "rows": 400}


def test_device_memory_trains_tables_larger_than_the_devices(tmp_path, capsys):
    """8 tables of 20,000 x 16 (1.36 MB each with row-wise Adagrad, 10.9 MB in all) on 8
    devices of 1 MB: the planner caches some, and the run trains."""
    from recsys import train

    out = tmp_path / "m.json"
    argv = ["--train-samples", "4096", "--eval-samples", "512", "--batch-size", "256", "--rows", "20000"]
    argv += ["--steps", "6", "--kernels", "xla", *MESH, "--sharding", "auto", "--device-memory", "1MB"]
    assert train.main([*argv, "--metrics-out", str(out)]) == 0
    assert "cached table" in capsys.readouterr().out  # the plan printed
    m = json.loads(out.read_text())
    placement = m["cache_placement"]
    cached = [t for t, p in placement.items() if "cached_rows" in p]
    assert cached and all(placement[t]["cached_rows"] < placement[t]["rows"] for t in cached)
    assert 0 < m["cache_hit_rate"] < 1 and m["train_loss"] > 0
