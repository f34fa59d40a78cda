"""GPU check of the Pallas kernels: achieved bandwidth against the device's, next to XLA.

    python -m benchmarks.gpu                 # on a machine with one NVIDIA GPU
    python -m benchmarks.gpu --smoke         # tiny shapes, any backend (CI runs this)
    benchmarks/gpu_check.sh                      # the kernel tests compiled, then this

Workload: `--features` tables of `--rows` rows x `--dim` stacked into one array, batch
`--batch`, fixed pooling 1 and 20, sum pooling, ids uniform over each table (so rows come
from HBM, not from L2: Zipf ids would flatter the figure). For each table dtype it prints
one JSON line per measurement:
  - lookup_fwd_pallas (the best of a small block-size sweep) and lookup_fwd_xla (recsys's
    fused per-position gather): useful bytes per second = (every gathered row + its id
    and coefficient + the pooled output) / time, as a fraction of the device's HBM
    bandwidth (`--peak-gbps`, or looked up from the device kind) and of a measured copy;
  - sparse_update_pallas / sparse_update_xla: row-wise Adagrad on the same batch.
Each has its ratio to the XLA path. Targets (issue 6): forward >= 70% of HBM bandwidth
and >= 1.3x XLA. Times are medians of `--steps` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels.embedding_bag import BagBlockSizes, embedding_bag
from recsys.lookup import init_tables, lookup, pooled_gather
from recsys.sparse import JaggedBatch, JaggedFeature
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec

# HBM bandwidth (bytes/s) by a substring of `device_kind`, most specific first.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("V100", 0.9e12),
)
SWEEP = (BagBlockSizes(bags_per_step=16, num_warps=4), BagBlockSizes(bags_per_step=32, num_warps=4))
SWEEP += (BagBlockSizes(bags_per_step=8, num_warps=2), BagBlockSizes(bags_per_step=64, num_warps=8))


def peak_bandwidth(device, override_gbps: float | None) -> float | None:
    if override_gbps:
        return override_gbps * 1e9
    kind = getattr(device, "device_kind", "")
    for name, value in PEAK_BANDWIDTH:
        if name in kind:
            return value
    return None


def median_seconds(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, steps: int) -> float:
    """Bytes/s of reading and writing an array once (what the device really streams)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1), x, steps=steps)
    return 2 * x.nbytes / seconds


def make_config(args, pooling: int, dtype: str) -> EmbeddingConfig:
    optimizer = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.01, eps=1e-8)
    return EmbeddingConfig(
        tables=tuple(
            TableSpec(name=f"t{i}", rows=args.rows, dim=args.dim, dtype=dtype, optimizer=optimizer)
            for i in range(args.features)
        ),
        features=tuple(
            FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=pooling) for i in range(args.features)
        ),
    )


def uniform_batch(config: EmbeddingConfig, batch: int, pooling: int, key) -> JaggedBatch:
    features = {}
    for i, spec in enumerate(config.features):
        rows = config.table(spec.table).rows
        ids = jax.random.randint(jax.random.fold_in(key, i), (batch, pooling), 0, rows, jnp.int32)
        features[spec.name] = JaggedFeature(ids=ids, lengths=jnp.full((batch,), pooling, jnp.int32))
    return JaggedBatch(features)


def run(args) -> list[dict]:
    device = jax.devices()[0]
    peak = peak_bandwidth(device, args.peak_gbps)
    copy = copy_bandwidth(args.copy_bytes, args.steps)
    common = {
        "device": getattr(device, "device_kind", str(device)),
        "backend": jax.default_backend(),
        "peak_gbps": round(peak / 1e9, 1) if peak else None,
        "copy_gbps": round(copy / 1e9, 1),
        "features": args.features,
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
    }
    records = []

    def emit(name, pooling, dtype, seconds, useful=None, **extra):
        record = {"name": name, "pooling": pooling, "dtype": dtype, "ms": round(seconds * 1e3, 3), **common}
        if useful is not None:
            record["useful_gbps"] = round(useful / seconds / 1e9, 1)
            record["fraction_of_copy"] = round(useful / seconds / copy, 3)
            if peak:
                record["fraction_of_peak"] = round(useful / seconds / peak, 3)
        record.update(extra)
        records.append(record)
        print(json.dumps(record), flush=True)

    key = jax.random.key(args.seed)
    for dtype in args.dtypes:
        for pooling in args.pooling:
            config = make_config(args, pooling, dtype)
            tables = init_tables(config, key)
            (group,) = tables  # one stacked group: every table has the same dim and dtype
            table = tables[group]
            batch = uniform_batch(config, args.batch, pooling, key)
            ids = jnp.stack([batch[f.name].ids + i * args.rows for i, f in enumerate(config.features)])
            coef = jnp.ones(ids.shape, jnp.float32)
            itemsize = jnp.dtype(dtype).itemsize
            useful = ids.size * (args.dim * itemsize + 8) + args.batch * args.features * args.dim * 4

            xla = jax.jit(lambda t, i, c: jnp.moveaxis(pooled_gather(t, i, c), 0, 1))
            xla_s = median_seconds(xla, table, ids, coef, steps=args.steps)
            emit("lookup_fwd_xla", pooling, dtype, xla_s, useful)
            best = None
            for sizes in SWEEP[: args.sweep]:
                pallas = jax.jit(lambda t, i, c, sizes=sizes: embedding_bag(t, i, c, block_sizes=sizes))
                seconds = median_seconds(pallas, table, ids, coef, steps=args.steps)
                if best is None or seconds < best[0]:
                    best = (seconds, sizes)
            seconds, sizes = best
            emit(
                "lookup_fwd_pallas",
                pooling,
                dtype,
                seconds,
                useful,
                vs_xla=round(xla_s / seconds, 2),
                bags_per_step=sizes.bags_per_step,
                num_warps=sizes.num_warps,
            )

            slots = init_slots(config)
            acts = lookup(config, tables, batch, kernels="xla")
            grads = jax.tree.map(lambda a: jnp.full(a.shape, 1e-3, a.dtype), acts)
            timed = {}
            for kernels in ("xla", "pallas"):
                update = jax.jit(functools.partial(sparse_update, config, kernels=kernels))
                step = jnp.int32(0)
                timed[kernels] = median_seconds(update, tables, slots, batch, grads, step, steps=args.steps)
            emit("sparse_update_xla", pooling, dtype, timed["xla"])
            emit(
                "sparse_update_pallas",
                pooling,
                dtype,
                timed["pallas"],
                vs_xla=round(timed["xla"] / timed["pallas"], 2),
            )
            del tables, table, slots
    return records


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--rows", type=int, default=500_000, help="rows per table")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    p.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"]
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sweep", type=int, default=len(SWEEP), help="block-size configurations tried (1-4)")
    p.add_argument("--copy-bytes", type=int, default=1 << 31, help="array size of the copy measurement")
    p.add_argument("--peak-gbps", type=float, default=None, help="device HBM bandwidth in GB/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes that run anywhere (interpreted off GPU)")
    args = p.parse_args(argv)
    if args.smoke:
        args.features, args.rows, args.dim, args.batch = 2, 64, 16, 16
        args.pooling, args.dtypes, args.steps, args.sweep, args.copy_bytes = [2], ["bfloat16"], 1, 1, 1 << 16
    if not 1 <= args.sweep <= len(SWEEP):
        p.error(f"--sweep must be in 1..{len(SWEEP)}")
    return args


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
