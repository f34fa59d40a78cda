"""Stress cases of `tests/test_collective_order.py`, run in a process of their own:

    python -m tests.collective_stress --mesh host=2,device=4 --routes auto rows --steps 8

Seven tables, one per sharding strategy, train for `--steps` steps on 8 simulated CPU
devices, once per route. Even steps look up uniform ids; odd steps send every id of a
feature to one row, more than a bucket holds, so bucketized routes overflow and take
their fallback branch. The compiled step's collectives must form one chain
(`mesh.collectives.unordered_collectives`). Prints one JSON line per route; a hang shows
as the parent's timeout.
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mesh", default="host=2,device=4")
    p.add_argument("--routes", nargs="+", default=["auto"])
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    mesh = make_mesh(args.mesh)
    model = DLRM(CONFIG, dense_features=4, bottom=(8, 8), top=(8, 1), rngs=nnx.Rngs(0))
    for route in args.routes:
        trainer = ShardedTrainer(
            model, optax.adam(0.01), plan(mesh), mesh, routing=RoutingOptions(route, 3.0)
        )
        state = trainer.init_state()
        step = trainer.train_step.lower(state, trainer.shard_batch(batch(0))).compile()
        losses = []
        for i in range(args.steps):
            state, loss = step(state, trainer.shard_batch(batch(i)))
            losses.append(float(loss))
        record = {
            "mesh": args.mesh,
            "route": route,
            "unordered": unordered_collectives(step.as_text()),
            "steps": args.steps,
            "fallbacks": int(state.routing_fallbacks),
            "finite": bool(np.isfinite(losses).all()),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
