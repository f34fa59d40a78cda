"""Embedding cache benchmark: hit rates beside Belady's optimum, and the cached step's
speed against all tables on the device.

    python -m benchmarks.cache                      # both parts
    python -m benchmarks.cache --only hit_rates --batches 400

`hit_rates`: for cache sizes 5/10/20/50% of the rows, each policy's hit rate and Belady's
offline optimum on the same trace, on Zipf(1.05) ids and on the Criteo sample's ids
(../shared/data, skipped when absent: its training split in file order, every
categorical column one table, encoded as the CLI does). One JSON line per (trace, size).

`step`: one DLRM trains the same batches all on the device, then cached at
`--load-factor` with the next batch admitted and its misses copied while a step runs
(`pipelined`), then cached with each admission waiting for the step before
(`serial`). The timed steps follow `--warmup` steps that fill the caches, so rows are
evicted and written back. One JSON line with samples/s of each, their ratios, the cache's
hit rate and bytes per step, and `hidden`: the share of the serial cache overhead the
pipeline removes. On CPU the host and device tiers are both RAM, so this measures the cache's own
work (admission, exchange, remapping), not a host link.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import optax
from flax import nnx

from recsys import host_malloc
from recsys.batching import to_batch
from recsys.cache import CacheConfig, CachedTrainer, belady_hit_rate, policy_hit_rate
from recsys.cache.trainer import TableCounts
from recsys.data import Dataset, open_data, train_batches
from recsys.models import DLRM
from recsys.specs import SparseOptimizerSpec
from recsys.synthetic import PlantedModel, SyntheticConfig, ZipfSampler
from recsys.training import Trainer

CRITEO = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "kaggle_train_10k.tsv"
SIZES = (0.05, 0.1, 0.2, 0.5)
POLICIES = ("lru", "lfu", "lookahead")


def zipf_traces(rows: int, batches: int, ids_per_batch: int, seed: int) -> dict[str, tuple[int, list]]:
    rng = np.random.default_rng(seed)
    sampler = ZipfSampler(rows, 1.05, rng)
    return {"zipf": (rows, [np.unique(sampler.sample(rng, ids_per_batch)) for _ in range(batches)])}


def criteo_traces(batch_size: int) -> dict[str, tuple[int, list]]:
    """{table: (rows, trace)} of the Criteo sample's categorical columns."""
    opened = open_data(f"criteo:{CRITEO}")
    traces = {c.name: (c.rows, []) for c in opened.schema.sparse}
    for examples, _ in train_batches(opened.train, batch_size, seed=0, shuffle=False):
        for name, (_, trace) in traces.items():
            trace.append(np.unique(examples.sparse[name].values))
        if len(next(iter(traces.values()))[1]) == len(opened.train) // batch_size:
            return traces


def hit_rates(name: str, traces: dict[str, tuple[int, list]], depth: int) -> None:
    """One JSON line per cache size: hits over every table of `traces`, per policy."""
    for size in SIZES:
        hits = dict.fromkeys((*POLICIES, "belady"), 0.0)
        lookups = 0
        for rows, trace in traces.values():
            capacity = max(1, int(size * rows))
            if max(len(ids) for ids in trace) > capacity:
                capacity = max(len(ids) for ids in trace)  # the smallest cache a batch fits in
            count = sum(len(ids) for ids in trace)
            lookups += count
            for policy in POLICIES:
                hits[policy] += count * policy_hit_rate(trace, rows, capacity, policy, depth)
            hits["belady"] += count * belady_hit_rate(trace, rows, capacity)
        rates = {k: round(v / lookups, 4) for k, v in hits.items()}
        ratio = {f"{p}_vs_belady": round(rates[p] / rates["belady"], 4) for p in POLICIES}
        print(
            json.dumps({"name": "cache_hit_rate", "trace": name, "cache_size": size, **rates, **ratio}),
            flush=True,
        )


def step_batches(args) -> tuple[SyntheticConfig, list]:
    synthetic = SyntheticConfig(
        num_sparse=args.tables, rows=args.rows, max_ids=args.pooling, min_ids=args.pooling
    )
    count = args.warmup + args.steps
    data = Dataset.in_memory(PlantedModel(synthetic, seed=0).generate(args.batch * count, seed=0).examples())
    examples = []
    for batch, _ in train_batches(data, args.batch, seed=0):
        examples.append(batch)
        if len(examples) == count:
            return synthetic, examples


def timed(step, batches, warmup: int, after_warmup=lambda: None) -> float:
    """Samples/s over the batches after `warmup`."""
    for item in batches[:warmup]:
        step(item)
    step(None)
    after_warmup()
    began = time.perf_counter()
    for item in batches[warmup:]:
        step(item)
    step(None)  # waits for the last step
    return (len(batches) - warmup) * len(batches[0][0].labels) / (time.perf_counter() - began)


def step_speed(args) -> None:
    synthetic, examples = step_batches(args)
    config = synthetic.embedding_config(
        args.dim, SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.05)
    )
    batches = [to_batch(config, e) for e in examples]
    mlps = {"bottom": (256, args.dim), "top": (256, 128, 1)}
    build = lambda: DLRM(config, dense_features=synthetic.num_dense, rngs=nnx.Rngs(0), **mlps)  # noqa: E731
    results = {"device": _run_uncached(build, batches, args.warmup)}
    cache = CacheConfig.for_all(config, args.load_factor, prefetch_depth=args.depth)
    for mode in ("pipelined", "serial"):
        trainer = CachedTrainer(build, optax.adam(1e-3), cache)
        results[mode], traffic = _run_cached(trainer, batches, args.warmup, mode)
    overhead = {m: 1 / results[m] - 1 / results["device"] for m in ("pipelined", "serial")}
    record = {
        "name": "cache_step",
        "load_factor": args.load_factor,
        **{f"{k}_samples_per_s": round(v, 1) for k, v in results.items()},
        "pipelined_vs_device": round(results["pipelined"] / results["device"], 3),
        "serial_vs_device": round(results["serial"] / results["device"], 3),
        "hidden": round(1 - overhead["pipelined"] / overhead["serial"], 3)
        if overhead["serial"] > 0
        else None,
        **{
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in traffic.items()
            if k != "cache_hit_rates"
        },
        "tables": args.tables,
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
        "pooling": args.pooling,
    }
    print(json.dumps(record), flush=True)


def _run_uncached(build, batches, warmup: int) -> float:
    trainer = Trainer(build(), optax.adam(1e-3))
    state = [trainer.init_state(), None]

    def step(batch):
        if batch is None:
            return state[1].block_until_ready()
        state[0], state[1] = trainer.train_step(state[0], trainer.place_batch(batch[0]))

    return timed(step, [(b,) for b in batches], warmup)


def _run_cached(trainer: CachedTrainer, batches, warmup: int, mode: str) -> tuple[float, dict]:
    """(samples/s, the cache's hit rate and bytes over the timed steps)."""
    state = [trainer.init_state(), None]
    items = list(trainer.lookahead(batches))
    # Every fill size compiled first: the steady state is timed, not the first compiles.
    trainer.precompile(state[0], max(len(ids) for b in batches for ids in trainer.unique_ids(b).values()))

    def step(item):
        if item is None:
            return state[1].block_until_ready()
        batch, upcoming = item
        state[0], state[1] = trainer.train_step(state[0], batch, upcoming, overlap=mode == "pipelined")

    def count_from_here():
        state[0].counts = {t: TableCounts() for t in state[0].counts}
        state[0].steps = 0

    rate = timed(step, [(b, u) for b, u in items], warmup, count_from_here)
    return rate, trainer.cache_metrics(state[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cache", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=["hit_rates", "step"], default=["hit_rates", "step"])
    p.add_argument("--batches", type=int, default=300, help="Zipf trace: batches")
    p.add_argument("--trace-rows", type=int, default=100_000, help="Zipf trace: table rows")
    p.add_argument("--trace-ids", type=int, default=4096, help="Zipf trace: ids drawn per batch")
    p.add_argument("--criteo-batch", type=int, default=256)
    p.add_argument("--depth", type=int, default=32, help="lookahead window (--prefetch-depth)")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--warmup", type=int, default=40, help="steps before the timed ones (they fill the caches)"
    )
    p.add_argument("--load-factor", type=float, default=0.2)
    args = p.parse_args(argv)
    host_malloc.tune()
    if "hit_rates" in args.only:
        hit_rates("zipf", zipf_traces(args.trace_rows, args.batches, args.trace_ids, seed=0), args.depth)
        if CRITEO.exists():
            hit_rates("criteo_sample", criteo_traces(args.criteo_batch), args.depth)
    if "step" in args.only:
        step_speed(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
