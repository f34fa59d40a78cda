"""The sharded DLRM train step per strategy: samples/s and bytes each device sends.

    python -m recsys.bench_sharded                        # 8 simulated CPU devices
    python -m recsys.bench_sharded --mesh host=2,device=4 --strategies grid table_row_wise

For every strategy (and one device without sharding, the baseline) it compiles the
`ShardedTrainer` step, reads from the optimized HLO how many bytes one device sends per
step by collective kind (`mesh.collectives.collective_bytes`; also on the overflow
fallback path of bucketized row-wise routing), and times `--steps` steps
after `--warmup`. One JSON line per strategy. On simulated CPU devices all "devices"
share the host's cores, so samples/s compares strategies with each other, not with real
hardware; the byte counts are what a real mesh would move.

`--kernels` takes one or more of auto, xla, cpu, pallas (`ShardedTrainer(kernels=...)`):
how owners look up and update their rows; each strategy runs under each.

`--comm` takes one or more compression settings (`recsys-train --comm`; "" is fp32): each
strategy runs under each, and the JSON line adds the bytes by what they carry
(`bytes_by_purpose`: fwd, bwd, allreduce, ids, ...) and, for a compressed setting, the
ratio of the compressed directions' bytes to the fp32 run's:

    python -m recsys.bench_sharded --dim 128 --strategies table_wise row_wise \
        --comm "" fwd=fp16,bwd=bf16,allreduce=bf16 fwd=fp8_e4m3,bwd=fp8_e4m3,allreduce=int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from recsys.lookup import KERNELS
from recsys.train import simulate_cpu_devices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="device=8")
    p.add_argument("--strategies", nargs="+", default=None, help="default: all")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--pooling", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--comm", nargs="+", default=[""], help="compression settings to compare")
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        choices=list(KERNELS),
        help="how owners look up and update their rows (recsys.lookup.owner_bags); several compare",
    )
    args = p.parse_args(argv)
    from mesh.collectives import CommConfig

    try:
        args.comm = [CommConfig.parse(c) for c in args.comm]
    except ValueError as e:
        p.error(str(e))

    from mesh import MeshSpec

    spec = MeshSpec.parse(args.mesh)
    simulate_cpu_devices(spec.size)  # before anything starts JAX
    _run(args, spec)
    return 0


def _run(args, spec) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from mesh import Strategy, make_mesh, plan_for_strategy
    from mesh.collectives import DIRECTIONS, CommConfig, bytes_by_purpose, collective_bytes
    from mesh.sharded_lookup import RoutingOptions
    from recsys.models import DLRM
    from recsys.sharded_trainer import ShardedTrainer
    from recsys.sparse import RaggedIds, pack_batch
    from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
    from recsys.synthetic import ZipfSampler
    from recsys.trainer import Batch, Trainer

    optimizer = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.01)
    config = EmbeddingConfig(
        tables=tuple(
            TableSpec(name=f"t{i}", rows=args.rows, dim=args.dim, optimizer=optimizer)
            for i in range(args.tables)
        ),
        features=tuple(
            FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=args.pooling) for i in range(args.tables)
        ),
    )
    rng = np.random.default_rng(0)
    samplers = [ZipfSampler(args.rows, 1.05, rng) for _ in config.tables]
    lengths = np.full(args.batch, args.pooling)
    batch = Batch(
        dense=jnp.asarray(rng.normal(size=(args.batch, 13)), jnp.float32),
        sparse=jax.tree.map(
            jnp.asarray,
            pack_batch(
                config,
                {
                    f"f{i}": RaggedIds(s.sample(rng, int(lengths.sum())), lengths)
                    for i, s in enumerate(samplers)
                },
            ),
        ),
        labels=jnp.asarray(rng.random(args.batch) < 0.25, jnp.float32),
    )
    model = lambda: DLRM(config, dense_features=13, bottom=(64, args.dim), top=(64, 32, 1), rngs=nnx.Rngs(0))  # noqa: E731

    fp32_purposes = {}

    def measure(trainer, placed, name, plan=None, comm=None):
        comm = comm or CommConfig()
        state = trainer.init_state()
        compiled = trainer.train_step.lower(state, placed).compile()
        hlo = compiled.as_text()
        sent = collective_bytes(hlo, spec.size) if plan is not None else {}
        purposes = bytes_by_purpose(hlo, spec.size) if plan is not None else {}
        fallback = collective_bytes(hlo, spec.size, branch=1) if plan is not None else {}
        times = []
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, loss = trainer.train_step(state, placed)
            jax.block_until_ready(loss)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        record = {
            "bench": "sharded_step",
            "strategy": name,
            "mesh": str(spec) if plan is not None else "device=1",
            "samples_per_s": round(args.batch / statistics.median(times), 1),
            "bytes_sent_per_device": sum(sent.values()),
            "bytes_by_collective": {k: v for k, v in sent.items() if v},
            "comm": str(comm),
            "kernels": trainer.kernels,
            "comm_bytes_per_step": sum(purposes.values()),
            "bytes_by_purpose": {k: v for k, v in purposes.items() if v},
            # A step whose bucketized routing overflowed sends this instead (`mesh.bucketed`).
            "fallback_bytes_per_device": sum(fallback.values()),
            "fallback_steps": int(getattr(state, "routing_fallbacks", 0)),
            # Scratch memory of the compiled step per device.
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
            "tables": args.tables,
            "rows": args.rows,
            "dim": args.dim,
            "pooling": args.pooling,
            "batch": args.batch,
            "backend": jax.default_backend(),
        }
        if plan is not None and comm == CommConfig():
            fp32_purposes[name] = purposes
        compressed = [d for d in DIRECTIONS if getattr(comm, d) != getattr(CommConfig(), d)]
        if compressed and name in fp32_purposes:
            base = sum(fp32_purposes[name][d] for d in compressed)
            record["compressed_directions"] = compressed
            record["compressed_ratio"] = (
                round(sum(purposes[d] for d in compressed) / base, 4) if base else None
            )
        print(json.dumps(record), flush=True)

    single = Trainer(model(), optax.adam(1e-3), kernels=args.kernels[0])
    measure(single, batch, "single_device")
    mesh = make_mesh(spec, jax.devices()[: spec.size])
    for strategy in args.strategies or [s.value for s in Strategy]:
        plan = plan_for_strategy(config.tables, spec, strategy)
        for comm in sorted(args.comm, key=lambda c: c != CommConfig()):  # the fp32 baseline first
            for kernels in args.kernels:
                routing = RoutingOptions(comm=comm)
                trainer = ShardedTrainer(
                    model(), optax.adam(1e-3), plan, mesh, routing=routing, kernels=kernels
                )
                measure(trainer, trainer.shard_batch(batch), strategy, plan, comm)


if __name__ == "__main__":
    raise SystemExit(main())
