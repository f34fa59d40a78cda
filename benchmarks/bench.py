"""Embedding and DLRM benchmarks on the configuration of the TorchRec peer benchmark.

    python -m benchmarks.bench                      # ours only, one JSON line per measurement
    python -m benchmarks.bench --peer /tmp/torchrec-venv/bin/python   # also TorchRec, + ratios

Workload (as ../shared/bench/torchrec_peer.py): 26 tables x 100,000 rows x 128 fp32, batch
4096, truncated-Zipf(1.05) ids permuted per table, fixed pooling factor 1 and 20, sum
pooling, row-wise Adagrad (lr 0.01, eps 1e-8); DLRM bottom MLP 512-256-128, top MLP
1024-1024-512-256-1, Adagrad for the dense part. Times are medians over --steps steps
after --warmup; compare ratios from one run, absolute times on a shared CPU drift.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recsys import host_malloc
from recsys.batching import Batch
from recsys.kernels import KERNELS
from recsys.lookup import init_tables, lookup
from recsys.models import DLRM
from recsys.models.mlp import DENSE_DTYPE_NAMES
from recsys.sparse import RaggedIds, pack_batch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig, FeatureSpec, SparseOptimizerSpec, TableSpec
from recsys.synthetic import ZipfSampler
from recsys.training import Trainer

DENSE_IN = 13
BOTTOM = (512, 256, 128)
TOP = (1024, 1024, 512, 256, 1)
PEER_NAMES = {
    "lookup_fwd": "tbe_fwd",
    "lookup_fwd_bwd_adagrad": "tbe_fwd_bwd_opt",
    "dlrm_train_step": "dlrm_train_step_dmp_ws1",
}


def bench_config(tables: int, rows: int, dim: int, pooling: int) -> EmbeddingConfig:
    optimizer = SparseOptimizerSpec(kind="rowwise_adagrad", learning_rate=0.01, eps=1e-8)
    return EmbeddingConfig(
        tables=tuple(
            TableSpec(name=f"t_{i}", rows=rows, dim=dim, optimizer=optimizer) for i in range(tables)
        ),
        features=tuple(FeatureSpec(name=f"f_{i}", table=f"t_{i}", max_ids=pooling) for i in range(tables)),
    )


def make_batches(config: EmbeddingConfig, args, pooling: int):
    rng = np.random.default_rng(args.seed)
    samplers = [ZipfSampler(args.rows, args.alpha, rng) for _ in config.tables]
    batches, unique = [], []
    for _ in range(args.num_batches):
        sparse = {}
        for feature, sampler in zip(config.features, samplers):
            ids = sampler.sample(rng, args.batch * pooling)
            unique.append(len(np.unique(ids)) / ids.size)
            sparse[feature.name] = RaggedIds(ids, np.full(args.batch, pooling))
        batches.append(
            Batch(
                dense=jnp.asarray(rng.random((args.batch, DENSE_IN), np.float32)),
                sparse=jax.tree.map(jnp.asarray, pack_batch(config, sparse)),
                labels=jnp.asarray(rng.integers(0, 2, args.batch).astype(np.float32)),
            )
        )
    return batches, float(np.mean(unique))


def time_steps(run_step, batches, args) -> list[float]:
    times = []
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        jax.block_until_ready(run_step(batch))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def emit(name: str, pooling: int, times: list[float], args, extra: dict) -> dict:
    median = statistics.median(times)
    record = {
        "name": name,
        "pooling": pooling,
        "samples_per_s": round(args.batch / median, 1),
        "step_ms": round(median * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "steps": len(times),
        "tables": args.tables,
        "rows": args.rows,
        "dim": args.dim,
        "batch": args.batch,
        "backend": jax.default_backend(),
        "kernels": args.kernels,
        "host_malloc": host_malloc.state(),
        **extra,
    }
    print(json.dumps(record), flush=True)
    return record


def run_ours(args) -> list[dict]:
    records = []
    for pooling in args.pooling:
        config = bench_config(args.tables, args.rows, args.dim, pooling)
        batches, unique = make_batches(config, args, pooling)
        extra = {"uniq_frac": round(unique, 4)}
        key = jax.random.key(args.seed)

        if "lookup_fwd" in args.only or "lookup_fwd_bwd_adagrad" in args.only:
            tables = init_tables(config, key)
            if "lookup_fwd" in args.only:
                forward = jax.jit(lambda tables, sparse: lookup(config, tables, sparse, args.kernels))
                times = time_steps(lambda b: forward(tables, b.sparse), batches, args)
                records.append(emit("lookup_fwd", pooling, times, args, extra))
            if "lookup_fwd_bwd_adagrad" in args.only:
                template = jax.eval_shape(lambda t, s: lookup(config, t, s), tables, batches[0].sparse)
                act_grads = jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype), template)

                def fwd_bwd(tables, slots, sparse):
                    acts = lookup(config, tables, sparse, args.kernels)
                    # A real backward's gradients depend on the forward, which orders the
                    # in-place update after the lookup; fixed gradients would not, and XLA
                    # then copies the tables to keep the lookup's input alive.
                    grads = jax.tree.map(lambda g, a: g + 0.0 * a, act_grads, acts)
                    tables, slots = sparse_update(
                        config, tables, slots, sparse, grads, jnp.int32(0), kernels=args.kernels
                    )
                    return tables, slots, acts

                step = jax.jit(fwd_bwd, donate_argnums=(0, 1))
                state = {"tables": tables, "slots": init_slots(config)}

                def run(batch):
                    state["tables"], state["slots"], acts = step(
                        state["tables"], state["slots"], batch.sparse
                    )
                    return acts, state  # wait for the table update too, not just the lookup

                times = time_steps(run, batches, args)
                records.append(emit("lookup_fwd_bwd_adagrad", pooling, times, args, extra))
            del tables

        for dense_dtype in args.dense_dtype if "dlrm_train_step" in args.only else ():
            bottom = (*BOTTOM[:-1], args.dim)  # the bottom MLP ends in the embedding dim
            model = DLRM(
                config,
                dense_features=DENSE_IN,
                bottom=bottom,
                top=TOP,
                rngs=nnx.Rngs(args.seed),
                dense_dtype=DENSE_DTYPE_NAMES[dense_dtype],
            )
            trainer = Trainer(model, optax.adagrad(0.01), kernels=args.kernels)
            del model
            holder = {"state": trainer.init_state()}

            def train(batch, holder=holder, trainer=trainer):
                holder["state"], loss = trainer.train_step(holder["state"], batch)
                return loss, holder["state"]  # the whole step, sparse update included

            times = time_steps(train, batches, args)
            records.append(
                emit("dlrm_train_step", pooling, times, args, {**extra, "dense_dtype": dense_dtype})
            )
            del holder, trainer
    return records


def run_peer(args) -> list[dict]:
    script = Path(args.peer_script)
    if not script.exists():
        raise SystemExit(f"peer script {script} not found (pass --peer-script)")
    common = [
        "--rows",
        str(args.rows),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--alpha",
        str(args.alpha),
        "--seed",
        str(args.seed),
    ]
    commands = []
    if {"lookup_fwd", "lookup_fwd_bwd_adagrad"} & set(args.only):
        commands.append(
            [args.peer, str(script), "--part", "tbe", "--pooling", *map(str, args.pooling), *common]
        )
    if "dlrm_train_step" in args.only:
        for pooling in args.pooling:
            commands.append(
                [args.peer, str(script), "--part", "dlrm", "--pooling-dlrm", str(pooling), *common]
            )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.peer_malloc == "tuned":
        env.update(host_malloc.ENVIRONMENT)
    records = []
    for command in commands:
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"peer failed ({' '.join(command)}):\n{out.stderr[-3000:]}")
        for line in out.stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                record["pooling"] = record["config"]["pooling"]
                record["peer"] = "torchrec"
                record["malloc"] = args.peer_malloc
                print(json.dumps(record), flush=True)
                records.append(record)
    return records


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--num-batches", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=list(PEER_NAMES), choices=list(PEER_NAMES))
    p.add_argument(
        "--kernels", default="auto", choices=list(KERNELS), help="lookup and sparse update path (lookup)"
    )
    p.add_argument(
        "--dense-dtype",
        nargs="+",
        default=["fp32"],
        choices=list(DENSE_DTYPE_NAMES),
        help="the DLRM's dense matmuls (bf16: mixed precision, recsys.models.mlp); the peer trains in fp32",
    )
    p.add_argument("--peer", default=None, help="python of a TorchRec venv: also run the peer benchmark")
    p.add_argument("--peer-script", default=str(here.parent / "shared" / "bench" / "torchrec_peer.py"))
    p.add_argument(
        "--peer-malloc",
        default="default",
        choices=["default", "tuned"],
        help="tuned: run the peer with the glibc malloc settings recsys gives itself "
        "(recsys.host_malloc.ENVIRONMENT); default: as TorchRec runs out of the box",
    )
    args = p.parse_args(argv)
    host_malloc.tune()  # before JAX computes anything
    ours = run_ours(args)
    if args.peer:
        peer = {(r["name"], r["pooling"]): r for r in run_peer(args)}
        for record in ours:
            match = peer.get((PEER_NAMES[record["name"]], record["pooling"]))
            if match:
                ratio = record["samples_per_s"] / match["samples_per_s"]
                print(
                    json.dumps(
                        {
                            "name": "ratio",
                            "ours": record["name"],
                            "peer": match["name"],
                            "pooling": record["pooling"],
                            **({"dense_dtype": record["dense_dtype"]} if "dense_dtype" in record else {}),
                            "ratio": round(ratio, 3),
                        }
                    ),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
