"""Command-line training: `recsys-train` or `python -m recsys.train`.

With no arguments it trains a small DLRM on synthetic planted-model data (about a
minute on a 2-core CPU), evaluates it on held-out samples and prints a summary:

    recsys-train --model dcnv2 --steps 500 --metrics-out /tmp/metrics.json
    recsys-train --data criteo:train.txt                      # last 20% held out
    recsys-train --data libfm:frappe.validation.libfm --eval-data libfm:frappe.test.libfm --epochs 10
    recsys-train --data csv:train.csv --label click --ignore id --checkpoint-dir ckpt --resume
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mesh import MeshSpec, ShardingPlan, Strategy, make_mesh, mesh_spec, plan_for_strategy, validate_plan
from mesh.collectives import CODECS, CommConfig, bytes_by_purpose
from mesh.cost import CommSettings, TableLoad
from mesh.planner import plan_tables, topology_for_mesh
from mesh.planner_cli import calibrate
from mesh.sharded_lookup import ROUTES, RoutingOptions
from mesh.topology import Topology
from recsys import cli_errors, metrics
from recsys.checkpoint import Checkpointer, CheckpointMismatch, check_compatible
from recsys.cli_errors import TrainingFailure, UsageError
from recsys.data import (
    ColumnOptions,
    DataSchema,
    Dataset,
    Examples,
    OnError,
    Position,
    Prefetcher,
    ReadOptions,
    eval_batches,
    open_data,
    parse_spec,
    steps_per_epoch,
    train_batches,
)
from recsys.lookup import KERNELS
from recsys.models import DLRM, DCNv2
from recsys.models.mlp import DENSE_DTYPE_NAMES
from recsys.progress import Progress
from recsys.sharded_trainer import ShardedTrainer, to_host
from recsys.sparse import InputPolicy, PackReport, pack_batch
from recsys.specs import EmbeddingConfig, InitializerSpec, OptimizerKind, SparseOptimizerSpec
from recsys.synthetic import PlantedModel, SyntheticConfig, SyntheticData
from recsys.trainer import Batch, Trainer
from recsys.watchdog import StepWatchdog, xla_collective_timeouts

OPTIMIZERS = [k.value for k in OptimizerKind]
# Dense optimizers by name: (learning rate, weight decay) -> optax transformation. AdamW
# decouples its decay from the gradient scale; the others add decay to the gradient.
_DENSE_OPTIMIZERS = {
    "adamw": lambda lr, wd: optax.adamw(lr, weight_decay=wd),
    "adam": lambda lr, wd: _decayed(optax.adam(lr), wd),
    "adagrad": lambda lr, wd: _decayed(optax.adagrad(lr), wd),
    "sgd": lambda lr, wd: _decayed(optax.sgd(lr), wd),
}


def _decayed(opt: optax.GradientTransformation, wd: float) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt


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


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _data_spec(text: str) -> str:
    try:
        parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="recsys-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument(
        "--data",
        type=_data_spec,
        default="synthetic",
        help="synthetic, criteo:PATH, libfm:PATH, csv:PATH or parquet:PATH (PATH: file, glob or a,b,c; "
        "criteo:DIR reads a preprocessed directory)",
    )
    p.add_argument("--eval-data", type=_data_spec, default=None, help="same forms; default: a held-out tail")
    p.add_argument("--holdout", type=_fraction, default=0.2, help="held-out fraction without --eval-data")
    p.add_argument("--model", default="dlrm", choices=["dlrm", "dcnv2"])
    p.add_argument("--embedding-dim", type=_positive_int, default=16)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--steps", type=_positive_int, default=None, help="train steps (overrides --epochs)")
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the embedding tables")
    p.add_argument("--optimizer", default="rowwise_adagrad", choices=OPTIMIZERS, help="of the tables")
    p.add_argument(
        "--init", default="normal", choices=["normal", "uniform"], help="table init (defaults scales)"
    )
    p.add_argument("--dense-optimizer", default="adamw", choices=list(_DENSE_OPTIMIZERS))
    p.add_argument("--dense-lr", type=float, default=1e-3)
    p.add_argument("--dense-lr-schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 on the rows a batch touches")
    p.add_argument("--dense-weight-decay", type=float, default=1.0, help="dense weight decay (AdamW's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics-out", default=None, help="write final metrics as JSON here")
    p.add_argument("--bottom-mlp", type=_int_list, default=None, help="default: 64,<embedding-dim>")
    p.add_argument("--top-mlp", type=_int_list, default=(64, 32, 1))
    p.add_argument("--cross-layers", type=_positive_int, default=2, help="DCNv2 only")
    p.add_argument("--cross-rank", type=_positive_int, default=32, help="DCNv2 only")
    g = p.add_argument_group("columns (csv/parquet)")
    g.add_argument("--label", default="label", help="label column (0/1)")
    g.add_argument("--dense", type=_name_list, default=(), help="dense columns, comma-separated")
    g.add_argument("--sparse", type=_name_list, default=None, help="sparse columns; default: all others")
    g.add_argument("--ignore", type=_name_list, default=(), help="columns left out of the default sparse set")
    g.add_argument("--multi-hot-sep", default=None, help="split sparse fields into bags on this, e.g. '|'")
    g.add_argument("--delimiter", default=None, help="csv delimiter (default ',', tab for .tsv)")
    g.add_argument("--libfm-fields", default=None, help="libFM field map file ('index field' lines)")
    g = p.add_argument_group("encoding (real data)")
    g.add_argument("--encoding", choices=["hash", "vocab"], default=None, help="default: hash for criteo")
    g.add_argument("--rows", type=_positive_int, default=None, help="table rows (synthetic default 1000)")
    g.add_argument("--max-rows", type=_positive_int, default=None, help="cap on table rows chosen from data")
    g.add_argument("--min-count", type=_positive_int, default=1, help="vocab: rarer tokens share row 0")
    g.add_argument("--max-ids", type=_positive_int, default=None, help="bag width (synthetic default 4)")
    g.add_argument("--on-error", choices=[e.value for e in OnError], default="raise", help="malformed lines")
    g = p.add_argument_group("synthetic data")
    g.add_argument("--train-samples", type=_positive_int, default=200_000)
    g.add_argument("--eval-samples", type=_positive_int, default=20_000)
    g.add_argument("--num-tables", type=_positive_int, default=8)
    p.add_argument(
        "--kernels",
        choices=list(KERNELS),
        default="auto",
        help="the lookup and the sparse update (on one device, and on the owners of sharded "
        "tables) through the Pallas kernels (auto: on GPU and TPU; pallas: anywhere, interpreted on "
        "CPU), the CPU kernels (auto: on CPU when built; cpu: required) or the XLA path (xla)",
    )
    p.add_argument(
        "--table-dtype",
        choices=list(TABLE_DTYPES),
        default="fp32",
        help="embedding table storage; bf16/fp16 tables are updated with stochastic rounding "
        "(deterministic given --seed)",
    )
    p.add_argument(
        "--dense-dtype",
        choices=list(DENSE_DTYPE_NAMES),
        default="fp32",
        help="the dense layers' matmuls: bf16 is mixed precision (fp32 parameters, products "
        "accumulated in fp32), what TPUs do by default; fast on bf16 matrix units (CPU AMX, GPU "
        "tensor cores)",
    )
    p.add_argument(
        "--state-dtype",
        choices=list(TABLE_DTYPES),
        default="fp32",
        help="the tables' optimizer state (accumulators, Adam's moments), updated in fp32 and "
        "stored with stochastic rounding; bf16 halves its memory (fp16 saturates at 65504 and "
        "loses Adam's v below 2^-24)",
    )
    g = p.add_argument_group("sharding")
    g.add_argument("--devices", type=_positive_int, default=1, help="devices (on CPU: simulated ones)")
    g.add_argument("--mesh", default=None, help="named mesh axes, e.g. host=2,device=4")
    g.add_argument(
        "--sharding",
        choices=["auto", *(s.value for s in Strategy)],
        default=None,
        help="one strategy for all tables, or auto: the cost-model planner (mesh.planner)",
    )
    g.add_argument(
        "--plan-topology",
        default=None,
        metavar="SPEC|calibrate",
        help="--sharding auto: memory and bandwidths to plan with, a topology spec as `python -m "
        "mesh.plan --calibrate` prints or a preset (hosts and devices come from the mesh), or "
        "calibrate: measure these devices first; default: the platform's preset and the memory "
        "the devices report",
    )
    g.add_argument("--plan", default=None, help="a ShardingPlan JSON file")
    g.add_argument(
        "--route",
        choices=list(ROUTES),
        default="auto",
        help="row-sharded tables: ids to every row shard (broadcast), or each id only to its "
        "row's owners, the row coming back (rows) or pooled there (pooled); auto: per group, "
        "the route that sends the fewest bytes",
    )
    g.add_argument(
        "--comm",
        type=_comm_config,
        default=CommConfig(),
        metavar="fwd=C,bwd=C,allreduce=C",
        help="compressed collectives, a codec per direction (fwd: pooled embeddings, bwd: their "
        f"gradients, allreduce: dense gradients, summed in fp32); C one of {', '.join(CODECS)}; "
        "directions left out stay fp32",
    )
    g.add_argument(
        "--route-capacity",
        type=float,
        default=2.0,
        help="bucketized routing: slots per peer as a multiple of its expected ids (overflow falls back)",
    )
    g = p.add_argument_group("several processes (hosts)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0; starts jax.distributed")
    g.add_argument("--num-processes", type=_positive_int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None)
    g.add_argument("--checkpoint-every", type=_positive_int, default=1000, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="newest checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--step-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="end the run with an error naming the step when a train or evaluation step runs "
        "longer than this (the devices stopped making progress); 0: wait forever",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    if args.step_timeout < 0:
        p.error(f"--step-timeout must be >= 0, got {args.step_timeout:g}")
    for flag in ("lr", "dense_lr"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    for flag in ("weight_decay", "dense_weight_decay"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.bottom_mlp is None:
        args.bottom_mlp = (64, args.embedding_dim)
    elif args.bottom_mlp[-1] != args.embedding_dim:
        p.error(f"--bottom-mlp must end in --embedding-dim {args.embedding_dim}, got {args.bottom_mlp}")
    if args.top_mlp[-1] != 1:
        p.error(f"--top-mlp must end in 1, got {args.top_mlp}")
    if args.resume and args.checkpoint_dir is None:
        p.error("--resume needs --checkpoint-dir")
    if args.plan and args.sharding:
        p.error("give --plan or --sharding, not both")
    if args.mesh:
        try:
            MeshSpec.parse(args.mesh)
        except ValueError as e:
            p.error(str(e))
    if args.coordinator and (args.num_processes is None or args.process_id is None):
        p.error("--coordinator needs --num-processes and --process-id")
    if args.route_capacity <= 0:
        p.error(f"--route-capacity must be > 0, got {args.route_capacity}")
    if args.comm != CommConfig() and not _sharded(args):
        p.error("--comm compresses the collectives of a sharded run: add --devices, --mesh or --sharding")
    return args


def build_model(args, config: EmbeddingConfig, dense_features: int) -> nnx.Module:
    rngs = nnx.Rngs(args.seed)
    dense_dtype = DENSE_DTYPE_NAMES[args.dense_dtype]
    if args.model == "dlrm":
        return DLRM(
            config,
            dense_features=dense_features,
            bottom=args.bottom_mlp,
            top=args.top_mlp,
            rngs=rngs,
            dense_dtype=dense_dtype,
        )
    return DCNv2(
        config,
        dense_features=dense_features,
        bottom=args.bottom_mlp,
        top=args.top_mlp,
        cross_layers=args.cross_layers,
        cross_rank=args.cross_rank,
        rngs=rngs,
        dense_dtype=dense_dtype,
    )


def _device_batch(config: EmbeddingConfig, examples: Examples, report: PackReport, place=None) -> Batch:
    """Packs a host batch and puts it on the device(s): `place` shards it over a mesh.

    With several processes, each packs and transfers only its own share of the global
    batch (its devices' samples, in process order)."""
    if jax.process_count() > 1:
        share = len(examples) // jax.process_count()
        examples = examples.slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    sparse = pack_batch(config, examples.sparse, _PACK_POLICY, report)
    batch = Batch(dense=examples.dense, sparse=sparse, labels=examples.labels)
    return place(batch) if place is not None else jax.tree.map(jnp.asarray, batch)


def _batch_placer(trainer):
    """None (one device), or how a host batch is sharded over the trainer's mesh."""
    if not isinstance(trainer, ShardedTrainer):
        return None
    return trainer.shard_batch if jax.process_count() == 1 else trainer.shard_local_batch


# Bag widths come from the training data (or --max-ids); a longer bag, in evaluation data
# or under a smaller --max-ids, keeps its first max_ids ids and is counted in the report.
_PACK_POLICY = InputPolicy(overlong="truncate")


def evaluate(
    trainer: Trainer,
    state,
    config: EmbeddingConfig,
    data: Dataset,
    batch_size: int,
    report: PackReport,
    watchdog: StepWatchdog | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) for every example, in order; batches prefetched."""
    probs, labels = [], []

    place = _batch_placer(trainer)

    def prepare(item):
        examples, valid = item
        return _device_batch(config, examples, report, place), examples.labels[:valid], valid

    with Prefetcher(eval_batches(data, batch_size), prepare) as batches:
        for i, (batch, batch_labels, valid) in enumerate(batches):
            predicted = trainer.predict(state, batch.dense, batch.sparse)
            if watchdog is not None:
                watchdog.watch(f"evaluation batch {i}", predicted)
            probs.append(np.asarray(to_host(predicted))[:valid])
            labels.append(batch_labels)
    return np.concatenate(probs), np.concatenate(labels)


@dataclasses.dataclass
class LoadedData:
    config: EmbeddingConfig
    num_dense: int
    train: Dataset
    eval: Dataset
    schema: DataSchema | None  # None for synthetic data
    planted_eval_logits: np.ndarray | None  # synthetic data only
    notes: list[str]


def read_options(args: argparse.Namespace) -> ReadOptions:
    columns = ColumnOptions(
        encoding=args.encoding,  # None: the format's default
        rows=args.rows,
        max_ids=args.max_ids,
        min_count=args.min_count,
        max_rows=args.max_rows or ColumnOptions().max_rows,
    )
    return ReadOptions(
        label=args.label,
        dense=args.dense,
        sparse=args.sparse,
        ignore=args.ignore,
        multi_hot_sep=args.multi_hot_sep,
        delimiter=args.delimiter,
        libfm_fields=args.libfm_fields,
        columns=columns,
        on_error=args.on_error,
        holdout=args.holdout,
    )


def load_data(
    args: argparse.Namespace, sparse_opt: SparseOptimizerSpec, schema: DataSchema | None
) -> LoadedData:
    if args.data == "synthetic":
        if args.eval_data is not None:
            raise ValueError("--eval-data needs real --data; synthetic data makes its own")
        synthetic = SyntheticConfig(
            num_sparse=args.num_tables, rows=args.rows or 1000, max_ids=args.max_ids or 4
        )
        planted = PlantedModel(synthetic, seed=args.seed)
        train_data = planted.generate(args.train_samples, seed=args.seed)
        eval_data = planted.generate(args.eval_samples, seed=args.seed + 10_000)
        config = synthetic.embedding_config(args.embedding_dim, sparse_opt)
        return LoadedData(
            config=config,
            num_dense=synthetic.num_dense,
            train=Dataset.in_memory(_examples(train_data), name=f"synthetic-train-{args.seed}"),
            eval=Dataset.in_memory(_examples(eval_data), name=f"synthetic-eval-{args.seed}"),
            schema=None,
            planted_eval_logits=eval_data.true_logits,
            notes=[],
        )
    opened = open_data(args.data, args.eval_data, read_options(args), schema=schema)
    notes = []
    for name, report in (("training", opened.train_report), ("evaluation", opened.eval_report)):
        if report.total():
            notes.append(f"{name} data: {report.summary()}")
    return LoadedData(
        config=opened.schema.embedding_config(args.embedding_dim, sparse_opt),
        num_dense=len(opened.schema.dense),
        train=opened.train,
        eval=opened.eval,
        schema=opened.schema,
        planted_eval_logits=None,
        notes=notes,
    )


def _examples(data: SyntheticData) -> Examples:
    return Examples(dense=data.dense, sparse=data.sparse, labels=data.labels)


# Settings that change what a run computes: a resumed run must match the checkpoint in all.
# The devices, mesh and plan may change: checkpoints are plan-independent, and a resumed
# run on another layout differs from the original only by float summation order.
_RUN_KEYS = (
    "data eval_data holdout label dense sparse ignore multi_hot_sep delimiter libfm_fields encoding rows "
    "max_rows min_count max_ids on_error model embedding_dim batch_size lr optimizer weight_decay init "
    "dense_optimizer dense_lr dense_lr_schedule dense_weight_decay seed bottom_mlp top_mlp cross_layers cross_rank train_samples eval_samples num_tables "
    "table_dtype state_dtype dense_dtype"
).split()


# Run settings added after checkpoints were first written: an older checkpoint's run used
# these values.
_ADDED_RUN_DEFAULTS = {"table_dtype": "fp32", "state_dtype": "fp32", "dense_dtype": "fp32"}


def run_settings(args: argparse.Namespace) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k in _RUN_KEYS}


def _open_checkpoints(args) -> tuple[Checkpointer | None, dict | None]:
    """The checkpointer and, when resuming, the latest checkpoint's metadata."""
    if args.checkpoint_dir is None:
        return None, None
    ckpt = Checkpointer(args.checkpoint_dir, keep=args.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is None:
        return ckpt, None
    if not args.resume:
        raise UsageError(
            f"{args.checkpoint_dir} already holds checkpoints (latest: step {latest}); "
            "pass --resume to continue from it, or choose another --checkpoint-dir"
        )
    metadata = ckpt.read_metadata(latest)["metadata"]
    saved = {**_ADDED_RUN_DEFAULTS, **metadata["run"]}
    check_compatible(saved, run_settings(args), args.checkpoint_dir, "run configuration")
    return ckpt, metadata


def sparse_optimizer(args: argparse.Namespace) -> SparseOptimizerSpec:
    """The tables' optimizer from --optimizer, --lr, --weight-decay and --state-dtype."""
    return SparseOptimizerSpec(
        kind=args.optimizer,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        state_dtype=TABLE_DTYPES[args.state_dtype],
    )


def dense_optimizer(args: argparse.Namespace, steps: int) -> optax.GradientTransformation:
    """The dense layers' optimizer from the --dense-* flags, for a run of `steps` steps."""
    # Cosine decay of the dense learning rate to 0 over the run: late epochs refine
    # instead of memorizing (on Frappe it held the test AUC at its peak).
    lr = (
        optax.cosine_decay_schedule(args.dense_lr, steps)
        if args.dense_lr_schedule == "cosine"
        else args.dense_lr
    )
    return _DENSE_OPTIMIZERS[args.dense_optimizer](lr, args.dense_weight_decay)


def _comm_config(text: str) -> CommConfig:
    try:
        return CommConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


TABLE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _sharded(args: argparse.Namespace) -> bool:
    return args.devices > 1 or bool(args.mesh or args.sharding or args.plan)


def _mesh(args: argparse.Namespace) -> jax.sharding.Mesh:
    spec = MeshSpec.parse(args.mesh) if args.mesh else MeshSpec.flat(args.devices)
    if args.devices > 1 and args.devices != spec.size:
        raise UsageError(f"--devices {args.devices} but --mesh {args.mesh} has {spec.size} devices")
    available = jax.devices()
    if len(available) < spec.size:
        raise UsageError(
            f"the mesh needs {spec.size} devices, {len(available)} are available"
            + (
                " (on CPU, pass --devices N before anything else uses JAX)"
                if available[0].platform == "cpu"
                else ""
            )
        )
    return make_mesh(spec, available[: spec.size])


def load_plan(path: str, config: EmbeddingConfig, mesh) -> ShardingPlan:
    """The ShardingPlan in a JSON file, checked against the tables and the mesh."""
    with open(path) as f:
        text = f.read()
    try:
        plan = ShardingPlan.from_json(text)
        validate_plan(plan, config.tables, mesh_spec(mesh))
    except json.JSONDecodeError as e:
        raise UsageError(f"--plan {path} is not JSON: {e}") from None
    except ValueError as e:
        raise UsageError(f"--plan {path}: {e}") from None
    return plan


def run_description(args: argparse.Namespace, mesh=None) -> str:
    """What a stalled step's error says of the run: its strategy and mesh."""
    if mesh is None:
        return "one device"
    strategy = f"plan {args.plan}" if args.plan else f"strategy {args.sharding or 'table_wise'}"
    return f"{strategy}, route {args.route}, mesh {mesh_spec(mesh)}"


def table_loads(config: EmbeddingConfig, mean_ids: Mapping[str, float]) -> list[TableLoad]:
    """What the planner needs of each table, from the specs and {feature: average ids}."""
    loads = []
    for t in config.tables:
        features = [f for f in config.features if f.table == t.name]
        loads.append(
            TableLoad(
                name=t.name,
                rows=t.rows,
                dim=t.dim,
                ids_per_sample=sum(mean_ids[f.name] for f in features),
                bag_width=sum(f.max_ids for f in features),
                element_bytes=np.dtype(t.dtype).itemsize,
                state_bytes=np.dtype(t.optimizer.state_dtype).itemsize,
                optimizer=t.optimizer.kind.value,
                scaled=any(f.weighted or f.pooling.value == "mean" for f in features),
                outputs=sum(1 if f.pooling.value != "none" else f.max_ids for f in features),
                sequence=any(f.pooling.value == "none" for f in features),
            )
        )
    return loads


def auto_plan(config: EmbeddingConfig, train: Dataset, mesh, args: argparse.Namespace) -> ShardingPlan:
    """The planner's plan for this model on this mesh. Average ids per sample come from
    the first training batch; memory from what the devices report."""
    examples, _ = next(train_batches(train, args.batch_size, seed=args.seed))
    mean_ids = {f.name: float(np.mean(examples.sparse[f.name].lengths)) for f in config.features}
    device = mesh.devices.reshape(-1)[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    measured = None
    if args.plan_topology == "calibrate":
        if jax.process_count() > 1:  # each process would measure its own figures and plan apart
            raise UsageError(
                "--plan-topology calibrate plans from one process's measurements; with several "
                "processes pass the spec `python -m mesh.plan --calibrate` prints"
            )
        measured = calibrate(rows=1 << 18, dim=64, batch=1 << 14, repeats=3)
    elif args.plan_topology:
        measured = Topology.parse(args.plan_topology)
    topo = topology_for_mesh(mesh_spec(mesh), device.platform, (stats or {}).get("bytes_limit"), measured)
    # A move cap, not a time budget: every process of a multi-process run plans alike.
    comm = CommSettings(forward=args.comm.fwd, backward=args.comm.bwd, capacity_factor=args.route_capacity)
    result = plan_tables(table_loads(config, mean_ids), topo, args.batch_size, comm=comm, max_moves=200)
    if jax.process_index() == 0 and not args.no_progress:
        print(f"planned for {topo}:\n{result}", flush=True)
    return result.plan


def simulate_cpu_devices(count: int) -> None:
    """On CPU, ask JAX for `count` simulated devices; a no-op once JAX has started
    (tests set their 8 devices in conftest) or on GPU/TPU."""
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except Exception:  # backends already initialized: keep what is there
        pass


def run(args: argparse.Namespace) -> dict:
    """Trains and evaluates as the flags say; returns the metrics."""
    with StepWatchdog(args.step_timeout) as watchdog:
        return _run(args, watchdog)


@contextlib.contextmanager
def _failures_named(where: Callable[[], str]):
    """Errors inside become `TrainingFailure`s that name `where()` (input errors, which
    name their file and line, stay as they are)."""
    try:
        yield
    except Exception as e:
        if cli_errors.is_input_error(e):
            raise
        raise TrainingFailure(where(), e) from e


def _run(args: argparse.Namespace, watchdog: StepWatchdog) -> dict:
    ckpt, resumed = _open_checkpoints(args)
    saved_schema = DataSchema.from_json(resumed["schema"]) if resumed and resumed["schema"] else None
    data = load_data(args, sparse_optimizer(args), saved_schema)
    # Normal init at 1/sqrt(dim) starts the dot-product interactions off zero; TorchRec's
    # small uniform init left DLRM on Frappe stalled for epochs before they took off.
    init, dtype = InitializerSpec(kind=args.init), TABLE_DTYPES[args.table_dtype]
    config = dataclasses.replace(
        data.config,
        tables=tuple(dataclasses.replace(t, initializer=init, dtype=dtype) for t in data.config.tables),
    )
    per_epoch = steps_per_epoch(data.train, args.batch_size)
    steps = args.steps or args.epochs * per_epoch
    if resumed is not None and args.dense_lr_schedule == "cosine" and resumed["total_steps"] != steps:
        raise CheckpointMismatch(
            f"the checkpoint in {args.checkpoint_dir} belongs to a run of {resumed['total_steps']} steps, "
            f"this one has {steps}; the cosine learning-rate schedule depends on the total"
        )
    dense_opt = dense_optimizer(args, steps)
    plan = None
    if _sharded(args):
        mesh = _mesh(args)
        if args.plan:
            plan = load_plan(args.plan, config, mesh)
        elif args.sharding == "auto":
            plan = auto_plan(config, data.train, mesh, args)
        else:
            plan = plan_for_strategy(config.tables, mesh_spec(mesh), args.sharding or "table_wise")
        if args.batch_size % mesh.devices.size:
            raise UsageError(
                f"--batch-size {args.batch_size} must be a multiple of the {mesh.devices.size} devices"
            )
        routing = RoutingOptions(args.route, args.route_capacity, comm=args.comm)
        # A builder, not a module: the trainer creates the tables already sharded.
        trainer = ShardedTrainer(
            lambda: build_model(args, config, data.num_dense),
            dense_opt,
            plan,
            mesh,
            routing=routing,
            kernels=args.kernels,
        )
    else:
        trainer = Trainer(build_model(args, config, data.num_dense), dense_opt, kernels=args.kernels)
    watchdog.describe = run_description(args, None if plan is None else trainer.mesh)
    place = _batch_placer(trainer)
    state = trainer.init_state()
    start_step, position = 0, Position()
    # Per-step losses: `pending` holds device scalars (reading one waits for its step), moved
    # to the host `history` every 20 steps and at each save.
    history: list[np.float32] = []
    pending: list[jax.Array] = []

    def flush() -> None:
        history.extend(jax.device_get(pending))
        pending.clear()

    if resumed is not None:
        if resumed["train_fingerprint"] != data.train.fingerprint:
            raise CheckpointMismatch(
                f"the checkpoint in {args.checkpoint_dir} was written while training on other data "
                f"(checkpoint: {resumed['train_fingerprint']}, now: {data.train.fingerprint})"
            )
        state, _ = ckpt.restore(trainer, state)
        start_step = int(state.step)
        position = Position.from_json(resumed["position"])
        history.extend(np.float32(x) for x in resumed["losses"])
        if start_step > steps:
            raise ValueError(f"the checkpoint is at step {start_step}, past the {steps} steps asked for")

    def save(step: int, after: Position) -> None:
        metadata = {
            "run": run_settings(args),
            "total_steps": steps,
            "position": after.to_json(),
            "losses": [float(x) for x in history],
            "schema": None if data.schema is None else data.schema.to_json(),
            "train_fingerprint": data.train.fingerprint,
        }
        ckpt.save(step, trainer, state, metadata)

    train_pack, eval_pack = PackReport(), PackReport()
    progress = Progress(steps, enabled=not args.no_progress and jax.process_index() == 0)
    batches = itertools.islice(
        train_batches(data.train, args.batch_size, seed=args.seed, start=position), steps - start_step
    )
    compile_s, timed_from, comm_bytes, fallback_bytes = None, time.perf_counter(), None, None
    start, step = time.perf_counter(), start_step
    with (
        _failures_named(lambda: f"step {step}"),
        Prefetcher(
            batches, lambda item: (_device_batch(config, item[0], train_pack, place), item[1])
        ) as prefetched,
    ):
        for step in range(start_step, steps):
            batch, after = next(prefetched)
            state, loss = trainer.train_step(state, batch)
            watchdog.watch(f"step {step}", loss)
            pending.append(loss)
            if step == start_step:
                jax.block_until_ready(loss)
                timed_from = time.perf_counter()  # the first step includes compilation
                compile_s = timed_from - start
                if plan is not None:  # read from the compiled step (cached: no second compile)
                    hlo = trainer.train_step.lower(state, batch).compile().as_text()
                    comm_bytes = bytes_by_purpose(hlo, int(trainer.mesh.devices.size))
                    fallback_bytes = bytes_by_purpose(hlo, int(trainer.mesh.devices.size), branch=1)
            done = step + 1
            if ckpt is not None and done % args.checkpoint_every == 0 and done < steps:
                flush()
                save(done, after)
            if done % 20 == 0 or done == steps:
                flush()
                recent = float(np.mean(history[-20:]))
                rate = (step - start_step) * args.batch_size / max(time.perf_counter() - timed_from, 1e-9)
                progress.update(done, loss=recent, samples_per_s=rate)
        jax.block_until_ready(state)
    elapsed = time.perf_counter() - timed_from
    if ckpt is not None:
        if start_step < steps:
            save(steps, after)
        ckpt.close()
    # Steps after the compiling first one; a run with none has no timed rate (JSON null).
    timed_steps = steps - start_step - 1
    samples_per_s = timed_steps * args.batch_size / elapsed if timed_steps > 0 else None
    flush()
    losses = np.asarray(history, np.float32)

    with _failures_named(lambda: "evaluation"):
        probs, labels = evaluate(trainer, state, config, data.eval, args.batch_size, eval_pack, watchdog)
    tail = losses[-max(1, steps // 10) :]
    result = {
        "auc": metrics.auc(labels, probs),
        "logloss": metrics.logloss(labels, probs),
        "normalized_entropy": metrics.normalized_entropy(labels, probs),
        "train_loss": float(np.mean(tail)),
        "steps": steps,
        "resumed_from_step": start_step if resumed is not None else None,
        "samples_per_s": samples_per_s,
        "compile_s": compile_s,
        "train_examples": len(data.train),
        "eval_samples": len(labels),
        "data": args.data,
        "eval_data": args.eval_data,
        "model": args.model,
        "optimizer": args.optimizer,
        "dense_optimizer": args.dense_optimizer,
        "batch_size": args.batch_size,
        "embedding_dim": args.embedding_dim,
        "seed": args.seed,
        "backend": jax.default_backend(),
        "devices": 1 if plan is None else int(trainer.mesh.devices.size),
        "mesh": None if plan is None else str(mesh_spec(trainer.mesh)),
        "plan": None if plan is None else plan.to_json(),
        "processes": jax.process_count(),
        "routing_fallbacks": None if plan is None else int(state.routing_fallbacks.addressable_data(0)),
        "table_dtype": args.table_dtype,
        "state_dtype": args.state_dtype,
        "dense_dtype": args.dense_dtype,
        "comm": None if plan is None else str(args.comm),
        # Bytes one device sends per step, by what they carry, read from the compiled step.
        "comm_bytes": comm_bytes,
        "comm_bytes_per_step": None if comm_bytes is None else sum(comm_bytes.values()),
        # What a step sends when bucketized routing overflows and it takes the broadcast
        # route (`routing_fallbacks` counts them); the same as above without such routes.
        "comm_bytes_fallback_per_step": None if fallback_bytes is None else sum(fallback_bytes.values()),
        "notes": data.notes
        + [f"{name}: {r.summary()}" for name, r in (("train", train_pack), ("eval", eval_pack)) if r.total()],
    }
    if result["routing_fallbacks"]:
        result["notes"].append(
            f"{result['routing_fallbacks']} of {steps - start_step} steps overflowed bucketized routing "
            "and took the broadcast route (correct, but slower): raise --route-capacity, or pass "
            "--route broadcast if ids are this skewed"
        )
    if data.planted_eval_logits is not None:
        planted_probs = 1 / (1 + np.exp(-data.planted_eval_logits))
        result["planted_auc"] = metrics.auc(labels, planted_probs)
        result["planted_logloss"] = metrics.logloss(labels, planted_probs)
    return result


def start_processes(args: argparse.Namespace) -> None:
    """Joins a multi-process run. On CPU each process simulates its share of --devices (or
    --mesh) and the processes talk over gloo; on GPU/TPU each uses its local devices."""
    total = MeshSpec.parse(args.mesh).size if args.mesh else args.devices
    if total % args.num_processes:
        raise UsageError(f"{total} devices do not split over {args.num_processes} processes")
    simulate_cpu_devices(total // args.num_processes)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # a JAX without CPU collectives options: GPU/TPU runs do not need them
        pass
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: exit status 0, or 2 for usage and input errors and 1 for failures during
    training, each reported as one line (`--debug`: with its traceback)."""
    args = parse_args(argv)
    # XLA:CPU reads these when its backend starts: its own collective timeouts must come
    # after the step watchdog's, which names the step.
    os.environ["XLA_FLAGS"] = xla_collective_timeouts(args.step_timeout, os.environ.get("XLA_FLAGS", ""))
    try:
        if args.coordinator:
            start_processes(args)
        elif _sharded(args):
            simulate_cpu_devices(MeshSpec.parse(args.mesh).size if args.mesh else args.devices)
        result = run(args)
        if jax.process_index() == 0:  # one report per run
            report(args, result)
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(f"recsys-train: error: {cli_errors.message(e)}", file=sys.stderr, flush=True)
        return cli_errors.exit_status(e)
    return 0


def report(args: argparse.Namespace, result: dict) -> None:
    """The run's summary on stdout, and its metrics file."""
    print(
        f"\n{args.model} on {args.data}: {result['steps']} steps of {args.batch_size}, "
        f"{result['samples_per_s'] or 0:.0f} samples/s (first step with compile {result['compile_s']:.1f}s)\n"
        f"  eval on {result['eval_samples']} samples: AUC {result['auc']:.4f}  log-loss "
        f"{result['logloss']:.4f}  NE {result['normalized_entropy']:.4f}\n"
        f"  train loss (last 10% of steps) {result['train_loss']:.4f}"
    )
    if "planted_auc" in result:
        print(
            f"  planted model on the same samples: AUC {result['planted_auc']:.4f}  "
            f"log-loss {result['planted_logloss']:.4f}"
        )
    for note in result["notes"]:
        print(f"  note: {note}")
    if args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"  metrics written to {args.metrics_out}")


if __name__ == "__main__":
    sys.exit(main())
