"""Input pipeline benchmark: the train step fed from real data files vs in-memory data.

    python -m benchmarks.input                 # Criteo sample from ../shared/data if present
    python -m benchmarks.input --criteo day_0.tsv --steps 300

One DLRM (the CLI's defaults unless --model-size large) trains on Criteo-format data
through every path a user has, each with the same schema, batch size and step count:

- `synthetic`: random examples of identical shapes held in memory (the baseline);
- `in_memory`: the Criteo examples themselves, parsed beforehand and held in memory
  (what is left of a gap to `synthetic` here comes from the ids, not from reading);
- `binary`: the preprocessed NumPy form (`preprocess_criteo`), memory-mapped;
- `text_cached`: the TSV, parsed once and kept (what files under 256 MiB get);
- `text_reparsed`: the TSV parsed again every epoch (what large files get);
- `text_reparsed_no_prefetch`: the same, parsing on the training thread.

Each prints one JSON line with samples/s and its ratio to `synthetic`, all from one run.
Without the shared Criteo sample a Criteo-format file of random lines is written first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np

from recsys import host_malloc
from recsys.batching import to_batch
from recsys.cli import flags
from recsys.cli.build import build_model, run_dense_optimizer, sparse_optimizer
from recsys.data import (
    ColumnOptions,
    Dataset,
    Examples,
    Prefetcher,
    ReadOptions,
    open_data,
    preprocess_criteo,
    train_batches,
)
from recsys.sparse import RaggedIds
from recsys.training import Trainer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "kaggle_train_10k.tsv"


def random_criteo(path: pathlib.Path, lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            ints = [str(int(x)) if x >= 0 else "" for x in rng.integers(-5, 500, 13)]
            cats = [f"{int(x):08x}" for x in rng.zipf(1.2, 26) % 100_000]
            f.write("\t".join([str(int(rng.random() < 0.25)), *ints, *cats]) + "\n")


def synthetic_like(data: Dataset, schema, seed: int = 0) -> Dataset:
    """In-memory random examples with the schema's shapes and table sizes."""
    n = len(data)
    rng = np.random.default_rng(seed)
    sparse = {c.name: RaggedIds(rng.integers(0, c.rows, n), np.ones(n, np.int64)) for c in schema.sparse}
    examples = Examples(
        dense=rng.normal(size=(n, len(schema.dense))).astype(np.float32),
        sparse=sparse,
        labels=(rng.random(n) < 0.25).astype(np.float32),
    )
    return Dataset.in_memory(examples, chunk_rows=65536)


def time_training(trainer, config, dataset, batch_size, steps, warmup, prefetch) -> float:
    """samples/s over `steps` steps after `warmup` (which includes compilation)."""
    state = trainer.init_state()
    items = itertools.islice(train_batches(dataset, batch_size, seed=0), warmup + steps)
    prepare = lambda item: trainer.place_batch(to_batch(config, item[0]))  # noqa: E731
    batches = Prefetcher(items, prepare, depth=8) if prefetch else map(prepare, items)
    for step, batch in enumerate(batches):
        if step == warmup:
            jax.block_until_ready(state)
            start = time.perf_counter()
        state, loss = trainer.train_step(state, batch)
    jax.block_until_ready(state)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--criteo", default=None, help="a Criteo TSV (default: the shared 10k sample)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="median over this many runs of each path")
    p.add_argument("--model-size", choices=["default", "large"], default="default")
    args = p.parse_args(argv)
    host_malloc.tune()
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        _run(args, pathlib.Path(tmp))
    return 0


def _run(args, workdir: pathlib.Path) -> None:
    path = pathlib.Path(args.criteo) if args.criteo else SHARED
    if not path.exists():
        path = workdir / "random_criteo.tsv"
        random_criteo(path, 10_000)
    spec = f"criteo:{path}"
    cached = open_data(spec)
    reparsed = open_data(spec, options=ReadOptions(cache_bytes=0))
    schema = cached.schema
    # The same table sizes as the text schema, so all paths train one compiled model.
    same_rows = ReadOptions(columns=ColumnOptions(encoding="hash", rows=[c.rows for c in schema.sparse]))
    preprocess_criteo(str(path), str(workdir / "bin"), same_rows, progress=lambda _: None)
    binary = open_data(f"criteo:{workdir / 'bin'}")
    assert binary.schema == schema

    model_args = ["--batch-size", str(args.batch_size)]
    if args.model_size == "large":
        model_args += ["--embedding-dim", "64", "--bottom-mlp", "512,256,64", "--top-mlp", "512,256,1"]
    cli = flags.parse(model_args)
    config = schema.embedding_config(cli.embedding_dim, sparse_optimizer(cli))
    trainer = Trainer(
        build_model(cli, config, len(schema.dense)), run_dense_optimizer(cli, args.warmup + args.steps)
    )

    paths = {
        "synthetic": (synthetic_like(cached.train, schema), True),
        "in_memory": (Dataset.in_memory(_all(cached.train)), True),
        "binary": (binary.train, True),
        "text_cached": (cached.train, True),
        "text_reparsed": (reparsed.train, True),
        "text_reparsed_no_prefetch": (reparsed.train, False),
    }
    rates = {name: [] for name in paths}
    for _ in range(args.repeats):  # interleaved, so drift hits every path alike
        for name, (dataset, prefetch) in paths.items():
            rates[name].append(
                time_training(trainer, config, dataset, args.batch_size, args.steps, args.warmup, prefetch)
            )
    base = statistics.median(rates["synthetic"])
    for name, values in rates.items():
        rate = statistics.median(values)
        record = {
            "bench": "input_pipeline",
            "path": name,
            "samples_per_s": round(rate, 1),
            "ratio_to_synthetic": round(rate / base, 3),
            "runs": [round(v, 1) for v in values],
            "data": str(path),
            "train_examples": len(cached.train),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "model_size": args.model_size,
            "cpu_count": os.cpu_count(),
            "backend": jax.default_backend(),
        }
        print(json.dumps(record), flush=True)


def _all(dataset: Dataset) -> Examples:
    return Examples.concat([dataset.chunk(i) for i in range(dataset.num_chunks)])


if __name__ == "__main__":
    raise SystemExit(main())
