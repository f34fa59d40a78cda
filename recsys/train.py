"""Command-line training: `recsys-train` or `python -m recsys.train`.

With no arguments it trains a small DLRM on synthetic planted-model data (about a
minute on a 2-core CPU), evaluates it on held-out samples and prints a summary:

    recsys-train --model dcnv2 --steps 500 --metrics-out /tmp/metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recsys import metrics
from recsys.models import DLRM, DCNv2
from recsys.progress import Progress
from recsys.sparse import RaggedIds, pack_batch
from recsys.specs import EmbeddingConfig, OptimizerKind, SparseOptimizerSpec
from recsys.synthetic import PlantedModel, SyntheticConfig, SyntheticData
from recsys.trainer import Batch, Trainer

OPTIMIZERS = [k.value for k in OptimizerKind]
# The dense half of each --optimizer choice (row-wise Adagrad has no dense analogue).
_DENSE_OPTIMIZERS = {
    "sgd": optax.sgd,
    "adagrad": optax.adagrad,
    "rowwise_adagrad": optax.adagrad,
    "adam": optax.adam,
}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="recsys-train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="synthetic", choices=["synthetic"], help="training data")
    p.add_argument("--model", default="dlrm", choices=["dlrm", "dcnv2"])
    p.add_argument("--embedding-dim", type=_positive_int, default=16)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--steps", type=_positive_int, default=None, help="train steps (overrides --epochs)")
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of tables and dense layers")
    p.add_argument("--optimizer", default="rowwise_adagrad", choices=OPTIMIZERS)
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 on the rows a batch touches")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-out", default=None, help="write final metrics as JSON here")
    p.add_argument("--bottom-mlp", type=_int_list, default=None, help="default: 64,<embedding-dim>")
    p.add_argument("--top-mlp", type=_int_list, default=(64, 32, 1))
    p.add_argument("--cross-layers", type=_positive_int, default=2, help="DCNv2 only")
    p.add_argument("--cross-rank", type=_positive_int, default=32, help="DCNv2 only")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--train-samples", type=_positive_int, default=200_000)
    g.add_argument("--eval-samples", type=_positive_int, default=20_000)
    g.add_argument("--num-tables", type=_positive_int, default=8)
    g.add_argument("--rows", type=_positive_int, default=1000)
    g.add_argument("--max-ids", type=_positive_int, default=4)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.bottom_mlp is None:
        args.bottom_mlp = (64, args.embedding_dim)
    elif args.bottom_mlp[-1] != args.embedding_dim:
        p.error(f"--bottom-mlp must end in --embedding-dim {args.embedding_dim}, got {args.bottom_mlp}")
    if args.top_mlp[-1] != 1:
        p.error(f"--top-mlp must end in 1, got {args.top_mlp}")
    return args


def build_model(args, config: EmbeddingConfig, dense_features: int) -> nnx.Module:
    rngs = nnx.Rngs(args.seed)
    if args.model == "dlrm":
        return DLRM(
            config, dense_features=dense_features, bottom=args.bottom_mlp, top=args.top_mlp, rngs=rngs
        )
    return DCNv2(
        config,
        dense_features=dense_features,
        bottom=args.bottom_mlp,
        top=args.top_mlp,
        cross_layers=args.cross_layers,
        cross_rank=args.cross_rank,
        rngs=rngs,
    )


def to_batch(config: EmbeddingConfig, data: SyntheticData) -> Batch:
    return Batch(
        dense=jnp.asarray(data.dense),
        sparse=jax.tree.map(jnp.asarray, pack_batch(config, data.sparse)),
        labels=jnp.asarray(data.labels),
    )


def train_batches(data: SyntheticData, batch_size: int, steps: int, seed: int) -> Iterator[SyntheticData]:
    """`steps` full batches, in a fresh seeded order of the batches every epoch."""
    per_epoch = len(data) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {len(data)} training samples")
    rng = np.random.default_rng([seed, 2])
    step = 0
    while step < steps:
        for b in rng.permutation(per_epoch):
            if step == steps:
                return
            yield data.slice(b * batch_size, (b + 1) * batch_size)
            step += 1


def evaluate(
    trainer: Trainer, state, config: EmbeddingConfig, data: SyntheticData, batch_size: int
) -> np.ndarray:
    """Probabilities for every sample; the last partial batch is padded, then trimmed."""
    probs = []
    for start in range(0, len(data), batch_size):
        stop = min(start + batch_size, len(data))
        part = data.slice(start, stop)
        if stop - start < batch_size:
            pad = data.slice(0, batch_size - (stop - start))
            part = _concat(part, pad)
        batch = to_batch(config, part)
        probs.append(np.asarray(trainer.predict(state, batch.dense, batch.sparse))[: stop - start])
    return np.concatenate(probs)


def _concat(a: SyntheticData, b: SyntheticData) -> SyntheticData:
    sparse = {
        k: RaggedIds(
            np.concatenate([a.sparse[k].values, b.sparse[k].values]),
            np.concatenate([a.sparse[k].lengths, b.sparse[k].lengths]),
        )
        for k in a.sparse
    }
    return SyntheticData(
        np.concatenate([a.dense, b.dense]),
        sparse,
        np.concatenate([a.labels, b.labels]),
        np.concatenate([a.true_logits, b.true_logits]),
    )


def run(args: argparse.Namespace) -> dict:
    synthetic = SyntheticConfig(num_sparse=args.num_tables, rows=args.rows, max_ids=args.max_ids)
    planted = PlantedModel(synthetic, seed=args.seed)
    train_data = planted.generate(args.train_samples, seed=args.seed)
    eval_data = planted.generate(args.eval_samples, seed=args.seed + 10_000)
    sparse_opt = SparseOptimizerSpec(
        kind=args.optimizer, learning_rate=args.lr, weight_decay=args.weight_decay
    )
    config = synthetic.embedding_config(args.embedding_dim, sparse_opt)
    model = build_model(args, config, synthetic.num_dense)
    trainer = Trainer(model, _DENSE_OPTIMIZERS[args.optimizer](args.lr))
    state = trainer.init_state()

    steps = args.steps or args.epochs * (len(train_data) // args.batch_size)
    progress = Progress(steps, enabled=not args.no_progress)
    losses = []  # device scalars; reading one waits for its step, so only read for display
    start = time.perf_counter()
    for step, part in enumerate(train_batches(train_data, args.batch_size, steps, args.seed)):
        state, loss = trainer.train_step(state, to_batch(config, part))
        losses.append(loss)
        if step == 0:
            jax.block_until_ready(loss)
            timed_from = time.perf_counter()  # the first step includes compilation
            compile_s = timed_from - start
        if (step + 1) % 20 == 0 or step + 1 == steps:
            recent = float(np.mean(jax.device_get(losses[-20:])))
            rate = step * args.batch_size / max(time.perf_counter() - timed_from, 1e-9)
            progress.update(step + 1, loss=recent, samples_per_s=rate)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - timed_from
    # Steps after the compiling first one; a one-step run has no timed steps (JSON null).
    samples_per_s = (steps - 1) * args.batch_size / elapsed if steps > 1 else None
    losses = np.asarray(jax.device_get(losses))

    probs = evaluate(trainer, state, config, eval_data, args.batch_size)
    planted_probs = 1 / (1 + np.exp(-eval_data.true_logits))
    tail = losses[-max(1, steps // 10) :]
    result = {
        "auc": metrics.auc(eval_data.labels, probs),
        "logloss": metrics.logloss(eval_data.labels, probs),
        "normalized_entropy": metrics.normalized_entropy(eval_data.labels, probs),
        "train_loss": float(np.mean(tail)),
        "steps": steps,
        "samples_per_s": samples_per_s,
        "compile_s": compile_s,
        "planted_auc": metrics.auc(eval_data.labels, planted_probs),
        "planted_logloss": metrics.logloss(eval_data.labels, planted_probs),
        "eval_samples": len(eval_data),
        "model": args.model,
        "optimizer": args.optimizer,
        "batch_size": args.batch_size,
        "embedding_dim": args.embedding_dim,
        "seed": args.seed,
        "backend": jax.default_backend(),
    }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(
        f"\n{args.model} on {args.data}: {result['steps']} steps of {args.batch_size}, "
        f"{result['samples_per_s'] or 0:.0f} samples/s (first step with compile {result['compile_s']:.1f}s)\n"
        f"  eval on {result['eval_samples']} samples: AUC {result['auc']:.4f}  log-loss "
        f"{result['logloss']:.4f}  NE {result['normalized_entropy']:.4f}\n"
        f"  train loss (last 10% of steps) {result['train_loss']:.4f}\n"
        f"  planted model on the same samples: AUC {result['planted_auc']:.4f}  "
        f"log-loss {result['planted_logloss']:.4f}"
    )
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"  metrics written to {args.metrics_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
