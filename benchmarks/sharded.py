"""The sharded DLRM train step per strategy: samples/s and bytes each device sends.

    python -m benchmarks.sharded                        # 8 simulated CPU devices
    python -m benchmarks.sharded --mesh host=2,device=4 --strategies grid table_row_wise

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

    python -m benchmarks.sharded --dim 128 --strategies table_wise row_wise \
        --comm "" fwd=fp16,bwd=bf16,allreduce=bf16 fwd=fp8_e4m3,bwd=fp8_e4m3,allreduce=int8

`--pipeline none sparse_dist semi_sync` (`recsys-train --pipeline`) compares the train
pipelines instead: per strategy, one trainer per mode, warmed up, then the modes take
turns for `--rounds` rounds of `--steps` steps run back to back (dispatched without
waiting, as training runs them). One JSON line per strategy: samples/s of each mode
(median round), each round's ratio to the first mode and their median, the id routing's
time alone (`routing_ms`) and the share of it sparse_dist saved (`hidden_share`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mesh import MeshSpec, Strategy, make_mesh, plan_for_strategy
from mesh.collectives import DIRECTIONS, CommConfig, bytes_by_purpose, collective_bytes
from mesh.meshes import simulate_cpu_devices
from mesh.routing import RoutingOptions
from recsys import host_malloc
from recsys.batching import Batch
from recsys.kernels import KERNELS
from recsys.models import DLRM
from recsys.sparse import RaggedIds, pack_batch
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
from recsys.synthetic import ZipfSampler
from recsys.training import ShardedTrainer, Trainer
from recsys.training.pipeline import Pipeline, train_steps


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
        "--pipeline", nargs="+", default=None, choices=[m.value for m in Pipeline], help="modes to compare"
    )
    p.add_argument("--rounds", type=int, default=5, help="--pipeline: rounds in which the modes take turns")
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["auto"],
        choices=list(KERNELS),
        help="how owners look up and update their rows (recsys.kernels); several compare",
    )
    args = p.parse_args(argv)
    try:
        args.comm = [CommConfig.parse(c) for c in args.comm]
    except ValueError as e:
        p.error(str(e))

    spec = MeshSpec.parse(args.mesh)
    simulate_cpu_devices(spec.size)  # before anything starts JAX
    host_malloc.tune()
    _run(args, spec)
    return 0


def _run(args, spec: MeshSpec) -> None:
    config, batch = dlrm_case(args)
    model = lambda: DLRM(config, dense_features=13, bottom=(64, args.dim), top=(64, 32, 1), rngs=nnx.Rngs(0))  # noqa: E731
    fp32_purposes: dict = {}
    single = Trainer(model(), optax.adam(1e-3), kernels=args.kernels[0])
    print(json.dumps(measure(args, spec, single, batch, "single_device")), flush=True)
    mesh = make_mesh(spec, jax.devices()[: spec.size])
    for strategy in args.strategies or [s.value for s in Strategy]:
        plan = plan_for_strategy(config.tables, spec, strategy)
        if args.pipeline:
            print(json.dumps(compare_pipelines(args, spec, model, plan, mesh, batch, strategy)), flush=True)
            continue
        for comm in sorted(args.comm, key=lambda c: c != CommConfig()):  # the fp32 baseline first
            for kernels in args.kernels:
                routing = RoutingOptions(comm=comm)
                trainer = ShardedTrainer(
                    model(), optax.adam(1e-3), plan, mesh, routing=routing, kernels=kernels
                )
                record = measure(args, spec, trainer, trainer.shard_batch(batch), strategy, plan, comm)
                _compression_ratio(record, fp32_purposes, comm)
                print(json.dumps(record), flush=True)


def dlrm_case(args) -> tuple[EmbeddingConfig, Batch]:
    """The benchmark's tables (row-wise Adagrad) and one batch of Zipf(1.05) ids."""
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
    ragged = {f"f{i}": RaggedIds(s.sample(rng, int(lengths.sum())), lengths) for i, s in enumerate(samplers)}
    batch = Batch(
        dense=jnp.asarray(rng.normal(size=(args.batch, 13)), jnp.float32),
        sparse=jax.tree.map(jnp.asarray, pack_batch(config, ragged)),
        labels=jnp.asarray(rng.random(args.batch) < 0.25, jnp.float32),
    )
    return config, batch


def measure(args, spec: MeshSpec, trainer, placed, name: str, plan=None, comm=None) -> dict:
    """Compiles the step, reads its bytes from the HLO and times `args.steps` steps: one
    JSON record."""
    comm = comm or CommConfig()
    state = trainer.init_state()
    compiled = trainer.train_step.lower(state, placed).compile()
    hlo = compiled.as_text()
    sharded = plan is not None
    sent = collective_bytes(hlo, spec.size) if sharded else {}
    purposes = bytes_by_purpose(hlo, spec.size) if sharded else {}
    fallback = collective_bytes(hlo, spec.size, branch=1) if sharded else {}
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, loss = compiled(state, placed)
        jax.block_until_ready(loss)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    record = {
        "bench": "sharded_step",
        "strategy": name,
        "mesh": str(spec) if sharded else "device=1",
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
        **{k: getattr(args, k) for k in ("tables", "rows", "dim", "pooling", "batch")},
        "backend": jax.default_backend(),
    }
    return record


def compare_pipelines(args, spec: MeshSpec, model, plan, mesh, batch: Batch, strategy: str) -> dict:
    """One trainer per `--pipeline` mode on the same batches; the modes take turns. Also
    the time the id routing takes alone (a sparse_dist trainer's `carry_step`), and the
    share of it the pipeline hid: (none's step - sparse_dist's) / routing."""
    runs, routing = {}, None
    for mode in args.pipeline:
        trainer = ShardedTrainer(
            model(), optax.adam(1e-3), plan, mesh, kernels=args.kernels[0], pipeline=mode
        )
        placed = trainer.shard_batch(batch)
        runs[mode] = train_steps(trainer, trainer.init_state(), itertools.repeat(placed))
        if mode == "sparse_dist":
            routing = _routing_alone(trainer, placed)

    def seconds(steps, count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            _, loss, _ = next(steps)
        jax.block_until_ready(loss)
        return time.perf_counter() - start

    for steps in runs.values():
        seconds(steps, max(args.warmup, 3))  # compiles the first, steady and plain steps
    times = {mode: [] for mode in runs}
    for _ in range(args.rounds):
        for mode, steps in runs.items():
            times[mode].append(seconds(steps, args.steps))
    base = args.pipeline[0]
    ratios = {m: [round(b / t, 3) for b, t in zip(times[base], times[m])] for m in runs if m != base}
    return {
        "bench": "pipeline",
        "strategy": strategy,
        "mesh": str(spec),
        **{
            f"{m}_samples_per_s": round(args.steps * args.batch / statistics.median(t), 1)
            for m, t in times.items()
        },
        **{f"{m}_vs_{base}": statistics.median(r) for m, r in ratios.items()},
        "per_round": ratios,
        **_hidden(times, routing, args.steps),
        **{k: getattr(args, k) for k in ("tables", "rows", "dim", "pooling", "batch", "steps", "rounds")},
        "backend": jax.default_backend(),
    }


def _routing_alone(trainer: ShardedTrainer, placed: Batch):
    """A function timing `count` calls of the id routing alone, dispatched back to back."""
    state = trainer.init_state()

    def seconds(count: int) -> float:
        jax.block_until_ready(trainer.carry_step(state, placed))  # compiled before the clock
        start = time.perf_counter()
        for _ in range(count):
            routed = trainer.carry_step(state, placed)
        jax.block_until_ready(routed)
        return time.perf_counter() - start

    return seconds


def _hidden(times: dict, routing, steps: int) -> dict:
    """The id routing's time per step alone, and the share of it sparse_dist hid."""
    if routing is None or "none" not in times:
        return {}
    route_s = statistics.median(routing(steps) for _ in range(3)) / steps
    saved_s = (statistics.median(times["none"]) - statistics.median(times["sparse_dist"])) / steps
    return {"routing_ms": round(route_s * 1e3, 3), "hidden_share": round(saved_s / route_s, 3)}


def _compression_ratio(record: dict, fp32_purposes: dict, comm: CommConfig) -> None:
    """Adds, for a compressed setting, the ratio of the compressed directions' bytes to
    the same strategy's fp32 run (which runs first)."""
    name, purposes = record["strategy"], record["bytes_by_purpose"]
    if comm == CommConfig():
        fp32_purposes[name] = purposes
    compressed = [d for d in DIRECTIONS if getattr(comm, d) != getattr(CommConfig(), d)]
    if compressed and name in fp32_purposes:
        base = sum(fp32_purposes[name].get(d, 0) for d in compressed)
        record["compressed_directions"] = compressed
        record["compressed_ratio"] = (
            round(sum(purposes.get(d, 0) for d in compressed) / base, 4) if base else None
        )


if __name__ == "__main__":
    raise SystemExit(main())
