"""Which collectives of the sharded train step run asynchronously beside compute, read
from the step compiled for an accelerator, with and without the train pipeline.

    pip install libtpu                                    # the TPU compiler; no TPU needed
    LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_to_all=true \
        python -m benchmarks.overlap --tpu v5e:2x4        # compiled for 8 v5e chips, here
    python -m benchmarks.overlap --gpu                    # on a machine with GPUs
    python -m benchmarks.overlap --cpu                    # 8 simulated CPU devices (smoke)

For every strategy and `--pipeline` mode it compiles the step most steps run (the plain
step, or the pipelined one: its batch routed, the next batch's ids to route) without
running it, and reads the compiled HLO's schedule (`mesh.collectives.hlo.overlap`). One
JSON line per (strategy, mode): per purpose (fwd, bwd, ids, stats, allreduce, ...), how
many collectives there are, how many run as async start/done pairs, how many of those
have compute scheduled between start and done (and how many compute instructions in
all, `compute_between`), and how many sit inside a conditional's
branch (the bucketized routes' overflow `cond`), where an async pair cannot reach
compute outside the branch. Under `sparse_dist` the `ids` collectives are the next
batch's. On CPU every collective is synchronous; the smoke mode checks the script.
"""

from __future__ import annotations

import argparse
import collections
import json

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.sharded import dlrm_case
from mesh import Strategy, mesh_spec, plan_for_strategy
from mesh.collectives.hlo import overlap
from mesh.meshes import simulate_cpu_devices
from recsys.models import DLRM
from recsys.training import ShardedTrainer
from recsys.training.pipeline import compiled_step


def devices(args) -> list:
    if args.tpu:
        from jax.experimental import topologies

        return list(topologies.get_topology_desc(platform="tpu", topology_name=args.tpu).devices)
    if args.cpu:
        return jax.devices("cpu")[:8]
    return jax.devices()


def step_hlo(trainer: ShardedTrainer, batch) -> str:
    """The HLO of the step most steps run, compiled from shapes alone."""
    state = jax.jit(trainer.init_state).lower().out_info
    sharding = NamedSharding(trainer.mesh, P(trainer.axes))
    placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), batch)
    return compiled_step(trainer, state, placed).as_text()


FIELDS = ("collectives", "async", "overlapped", "compute_between", "in_branch")


def summary(records: list[dict]) -> dict:
    """{purpose: {collectives, async, overlapped, compute_between, in_branch}}."""
    out: dict = collections.defaultdict(lambda: dict.fromkeys(FIELDS, 0))
    for r in records:
        row = out[r["purpose"] or "other"]
        row["collectives"] += 1
        row["async"] += r["async"]
        row["overlapped"] += r["overlapped"] > 0
        row["compute_between"] += r["overlapped"]
        row["in_branch"] += r["in_branch"]
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--tpu", metavar="TOPOLOGY", help="compile for a TPU topology, e.g. v5e:2x4 (needs libtpu)"
    )
    target.add_argument("--gpu", action="store_true", help="compile for this machine's GPUs")
    target.add_argument("--cpu", action="store_true", help="8 simulated CPU devices (checks the script)")
    p.add_argument("--strategies", nargs="+", default=["table_wise", "row_wise", "column_wise", "grid"])
    p.add_argument("--pipeline", nargs="+", default=["none", "sparse_dist", "semi_sync"])
    p.add_argument("--kernels", default="xla", help="recsys.kernels path of the owners' lookup and update")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--pooling", type=int, default=2)
    p.add_argument("--batch", type=int, default=1024)
    args = p.parse_args(argv)
    if args.cpu:
        simulate_cpu_devices(8)
    config, batch = dlrm_case(args)
    found = devices(args)
    mesh = jax.sharding.Mesh(np.array(found), ("device",))
    model = lambda: DLRM(config, dense_features=13, bottom=(64, args.dim), top=(64, 32, 1), rngs=nnx.Rngs(0))  # noqa: E731
    for strategy in args.strategies:
        Strategy(strategy)
        plan = plan_for_strategy(config.tables, mesh_spec(mesh), strategy)
        for mode in args.pipeline:
            trainer = ShardedTrainer(model, optax.adam(1e-3), plan, mesh, kernels=args.kernels, pipeline=mode)
            record = {
                "bench": "overlap",
                "strategy": strategy,
                "pipeline": mode,
                "target": args.tpu or ("gpu" if args.gpu else "cpu"),
                "devices": len(found),
                "device_kind": getattr(found[0], "device_kind", ""),
                "by_purpose": summary(overlap(step_hlo(trainer, batch))),
            }
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
