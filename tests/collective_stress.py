"""Stress cases of `tests/test_collective_order.py`, run in a process of their own:

    python -m tests.collective_stress --mesh host=2,device=4 --routes auto rows --steps 8
    python -m tests.collective_stress --routes rows --pipelined rows   # also sparse_dist

Seven tables, one per sharding strategy, train for `--steps` steps on 8 simulated CPU
devices, once per route. Even steps look up uniform ids; odd steps send every id of a
feature to one row, more than a bucket holds, so bucketized routes overflow and take
their fallback branch. The compiled step's collectives must form one chain
(`mesh.collectives.unordered_collectives`). Routes named in `--pipelined` train again
with the `sparse_dist` pipeline (each step also routes the next batch's ids): its steady
step's collectives must form one chain too, and its losses and tables must equal the
plain run's bit for bit. Prints one JSON line per route; a hang shows as the parent's
timeout. They also train with `semi_sync` (each step looks the next batch up before its
update), whose step's collectives must form one chain.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from mesh import ShardingPlan, Strategy, make_mesh, mesh_spec, plan_for_strategy  # noqa: E402
from mesh.collectives import unordered_collectives  # noqa: E402
from mesh.routing import RoutingOptions  # noqa: E402
from recsys.batching import Batch  # noqa: E402
from recsys.models import DLRM  # noqa: E402
from recsys.sparse import RaggedIds, pack_batch  # noqa: E402
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec  # noqa: E402
from recsys.training import ShardedTrainer  # noqa: E402

STRATEGIES = [s.value for s in Strategy]
OPT = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.1)
CONFIG = EmbeddingConfig(
    tables=tuple(TableSpec(name=f"t_{s}", rows=64, dim=8, optimizer=OPT) for s in STRATEGIES),
    features=tuple(
        FeatureSpec(name=f"f_{s}", table=f"t_{s}", max_ids=4, pooling="mean" if i % 2 else "sum")
        for i, s in enumerate(STRATEGIES)
    ),
)
BATCH = 64


def plan(mesh) -> ShardingPlan:
    spec = mesh_spec(mesh)
    return ShardingPlan(
        {
            t.name: plan_for_strategy(CONFIG.tables, spec, s).tables[t.name]
            for t, s in zip(CONFIG.tables, STRATEGIES)
        },
        spec,
    )


def batch(step: int) -> Batch:
    rng = np.random.default_rng(step)
    ragged = {}
    for f in CONFIG.features:
        lengths = np.full(BATCH, f.max_ids)
        values = rng.integers(0, 64, lengths.sum()) if step % 2 == 0 else np.zeros(lengths.sum(), int)
        ragged[f.name] = RaggedIds(values, lengths)
    return Batch(
        dense=jnp.asarray(rng.normal(size=(BATCH, 4)), jnp.float32),
        sparse=jax.tree.map(jnp.asarray, pack_batch(CONFIG, ragged)),
        labels=jnp.asarray(rng.random(BATCH) < 0.5, jnp.float32),
    )


def plain_run(trainer: ShardedTrainer, batches: list) -> tuple[list, dict, str, int]:
    """(losses, tables, the compiled step's HLO, fallbacks) of the steps without a pipeline."""
    state = trainer.init_state()
    step = trainer.train_step.lower(state, batches[0]).compile()
    losses = []
    for b in batches:
        state, loss = step(state, b)
        losses.append(float(loss))
    return losses, trainer.logical_tables(state), step.as_text(), int(state.routing_fallbacks)


def pipelined_run(trainer: ShardedTrainer, batches: list) -> tuple[list, dict, str]:
    """(losses, tables, the step's HLO) under the trainer's pipeline: each step takes what
    the step before prepared of its batch and prepares the next one's."""
    state, losses = trainer.init_state(), []
    carry = trainer.carry_step(state, batches[0])
    step = trainer.pipelined_step.lower(state, carry, batches[0], batches[1]).compile()
    for b, following in zip(batches, [*batches[1:], batches[-1]]):
        state, carry, loss = step(state, carry, b, following)
        losses.append(float(loss))
    return losses, trainer.logical_tables(state), step.as_text()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mesh", default="host=2,device=4")
    p.add_argument("--routes", nargs="+", default=["auto"])
    p.add_argument("--pipelined", nargs="*", default=[], help="routes that also train with sparse_dist")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    mesh = make_mesh(args.mesh)
    model = DLRM(CONFIG, dense_features=4, bottom=(8, 8), top=(8, 1), rngs=nnx.Rngs(0))
    for route in args.routes:
        options = dict(routing=RoutingOptions(route, 3.0))
        trainer = ShardedTrainer(model, optax.adam(0.01), plan(mesh), mesh, **options)
        batches = [trainer.shard_batch(batch(i)) for i in range(args.steps)]
        losses, tables, hlo, fallbacks = plain_run(trainer, batches)
        record = {
            "mesh": args.mesh,
            "route": route,
            "unordered": unordered_collectives(hlo),
            "steps": args.steps,
            "fallbacks": fallbacks,
            "finite": bool(np.isfinite(losses).all()),
        }
        if route in args.pipelined:
            trainer = ShardedTrainer(
                model, optax.adam(0.01), plan(mesh), mesh, pipeline="sparse_dist", **options
            )
            got, got_tables, steady = pipelined_run(trainer, batches)
            record["pipelined_unordered"] = unordered_collectives(steady)
            record["pipelined_equal"] = got == losses and all(
                np.array_equal(got_tables[t], tables[t]) for t in tables
            )
            trainer = ShardedTrainer(
                model, optax.adam(0.01), plan(mesh), mesh, pipeline="semi_sync", **options
            )
            got, _, steady = pipelined_run(trainer, batches)
            record["semi_sync_unordered"] = unordered_collectives(steady)
            record["semi_sync_finite"] = bool(np.isfinite(got).all())
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
