"""Embedding cache benchmark: hit rates beside Belady's optimum, and the cached step's
speed against all tables on the device.

    python -m benchmarks.cache                      # both parts
    python -m benchmarks.cache --only hit_rates --batches 400

`hit_rates`: for cache sizes 5/10/20/50% of the rows, each policy's hit rate and Belady's
offline optimum on the same trace, on Zipf(1.05) ids and on the Criteo sample's ids
(../shared/data, skipped when absent: its training split in file order, every
categorical column one table, encoded as the CLI does). One JSON line per (trace, size).

`step`: one DLRM trains the same batches three ways: all on the device; cached at
`--load-factor` with the next batch admitted and its misses copied while a step runs
(`pipelined`); cached with each admission waiting for the step before (`serial`). Each
warms up for `--warmup` steps that fill the caches (so rows are evicted and written
back), then the three take turns for `--rounds` rounds of `--steps` steps, so each
round's ratios compare steps run side by side. One JSON line: samples/s of each (median
round), the median of the rounds' ratios and each round's, the cache's hit rate and bytes
per step, and `hidden`: the share of the serial cache overhead the pipeline removes. On
CPU the host and device tiers are both RAM, so this measures the cache's own work
(admission, exchange, remapping), not a host link.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
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
MODES = ("pipelined", "serial")


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
    count = args.warmup + args.rounds * args.steps
    data = Dataset.in_memory(PlantedModel(synthetic, seed=0).generate(args.batch * count, seed=0).examples())
    examples = []
    for batch, _ in train_batches(data, args.batch, seed=0):
        examples.append(batch)
        if len(examples) == count:
            return synthetic, examples


def segments(step, items: list):
    """A function running the next `count` of `items` through `step` (which returns the
    step's loss) and returning the seconds until the last loss is ready."""
    done = [0]

    def run(count: int) -> float:
        began = time.perf_counter()
        loss = None
        for item in items[done[0] : done[0] + count]:
            loss = step(item)
        jax.block_until_ready(loss)
        done[0] += count
        return time.perf_counter() - began

    return run


def step_speed(args) -> None:
    """Every mode warms up, then the modes take turns: `--rounds` rounds of `--steps`
    steps each, so that each round's ratios compare steps run side by side."""
    synthetic, examples = step_batches(args)
    config = synthetic.embedding_config(
        args.dim, SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.05)
    )
    batches = [to_batch(config, e) for e in examples]
    mlps = {"bottom": (256, args.dim), "top": (256, 128, 1)}
    build = lambda: DLRM(config, dense_features=synthetic.num_dense, rngs=nnx.Rngs(0), **mlps)  # noqa: E731
    cache = CacheConfig.for_all(config, args.load_factor, prefetch_depth=args.depth)
    runs = {"device": _uncached_segments(build, batches)}
    cached = {m: _CachedRun(CachedTrainer(build, optax.adam(1e-3), cache), batches, m) for m in MODES}
    runs.update({m: run.segments for m, run in cached.items()})
    for run in runs.values():
        run(args.warmup)
    for run in cached.values():
        run.count_from_here()
    seconds = {m: [] for m in runs}
    for _ in range(args.rounds):
        for mode, run in runs.items():
            seconds[mode].append(run(args.steps))
    samples = args.steps * args.batch
    ratios = {m: statistics.median(d / c for d, c in zip(seconds["device"], seconds[m])) for m in MODES}
    overhead = {m: statistics.median(seconds[m]) - statistics.median(seconds["device"]) for m in MODES}
    traffic = cached["pipelined"].trainer.cache_metrics(cached["pipelined"].state[0])
    record = {
        "name": "cache_step",
        "load_factor": args.load_factor,
        **{f"{m}_samples_per_s": round(samples / statistics.median(s), 1) for m, s in seconds.items()},
        **{f"{m}_vs_device": round(r, 3) for m, r in ratios.items()},
        "per_round_vs_device": {
            m: [round(d / c, 3) for d, c in zip(seconds["device"], seconds[m])] for m in MODES
        },
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
        "rounds": args.rounds,
        "steps": args.steps,
    }
    print(json.dumps(record), flush=True)


def _uncached_segments(build, batches):
    trainer = Trainer(build(), optax.adam(1e-3))
    state = [trainer.init_state()]

    def step(batch):
        state[0], loss = trainer.train_step(state[0], trainer.place_batch(batch))
        return loss

    return segments(step, batches)


class _CachedRun:
    """A cached trainer on the batches, admitting the next batch while a step runs
    (`pipelined`) or after it (`serial`)."""

    def __init__(self, trainer: CachedTrainer, batches, mode: str):
        self.trainer, self.state = trainer, [trainer.init_state()]
        items = list(trainer.lookahead(batches))
        # Every fill size compiled first: the steady state is timed, not the first compiles.
        widest = max(len(ids) for b in batches for ids in trainer.unique_ids(b).values())
        trainer.precompile(self.state[0], widest)
        overlap = mode == "pipelined"

        def step(item):
            batch, upcoming = item
            self.state[0], loss = trainer.train_step(self.state[0], batch, upcoming, overlap=overlap)
            return loss

        self.segments = segments(step, items)

    def count_from_here(self) -> None:
        """The cache's traffic counted from the next step on."""
        self.state[0].counts = {t: TableCounts() for t in self.state[0].counts}
        self.state[0].steps = 0


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
    p.add_argument("--steps", type=int, default=20, help="steps per mode and round")
    p.add_argument("--rounds", type=int, default=5, help="rounds in which the modes take turns")
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
