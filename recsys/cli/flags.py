"""`recsys-train`'s flags -> a `RunConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mesh.collectives import CODECS, CommConfig
from mesh.plan import Strategy
from mesh.routing import ROUTES
from pallas_kernels.dtypes import SHORT_NAMES
from recsys.cache.slots import CachePolicy
from recsys.cli.config import RunConfig
from recsys.cli.errors import UsageError
from recsys.data import OnError, parse_spec
from recsys.kernels import KERNELS
from recsys.models.mlp import DENSE_DTYPE_NAMES
from recsys.specs import Decay, OptimizerKind
from recsys.training.optimizers import DENSE_OPTIMIZERS, SCHEDULES
from recsys.training.pipeline import Pipeline

DESCRIPTION = """\
Trains and evaluates a DLRM or DCNv2, on one device or with its tables sharded over many.

With no arguments it trains a small DLRM on synthetic planted-model data (about a
minute on a 2-core CPU), evaluates it on held-out samples and prints a summary."""

EPILOG = """\
examples:
  recsys-train --model dcnv2 --steps 500 --metrics-out /tmp/metrics.json
  recsys-train --data criteo:train.txt                      # last 20% held out
  recsys-train --data libfm:frappe.validation.libfm --eval-data libfm:frappe.test.libfm --epochs 10
  recsys-train --data csv:train.csv --label click --ignore id --checkpoint-dir ckpt --resume
  recsys-train --devices 8 --sharding auto                  # plan the tables over 8 devices"""


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as a `UsageError` (one line from `main`), not a usage dump."""

    def error(self, message: str):
        raise UsageError(message)


def parse(argv: Sequence[str] | None = None) -> RunConfig:
    """The run the flags describe. Raises UsageError naming the flag that is wrong."""
    args = parser().parse_args(argv)
    try:
        return RunConfig(**vars(args))
    except ValueError as e:
        raise UsageError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="recsys-train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_flags(p)
    _data_flags(p)
    _sharding_flags(p)
    _cache_flags(p)
    _run_flags(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="dlrm",
        choices=["dlrm", "dcnv2", "lr", "fm", "deepfm", "wide_deep", "din"],
        help="lr: logistic regression, fm: a factorization machine with --embedding-dim factors; "
        "deepfm and wide_deep add an MLP of --top-mlp over the features' vectors; din pools "
        "--sequence histories by attention against the other features",
    )
    p.add_argument("--embedding-dim", type=_positive_int, default=16)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--steps", type=_positive_int, default=None, help="train steps (overrides --epochs)")
    p.add_argument("--epochs", type=_positive_int, default=1)
    g = p.add_argument_group("validation (the training data's last part; never the evaluation data)")
    g.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="evaluate on the validation split every STEPS steps and at the end; the final "
        "metrics come from the state with the best validation log-loss",
    )
    g.add_argument(
        "--early-stop",
        type=_positive_int,
        default=None,
        metavar="PATIENCE",
        help="stop after PATIENCE validation evaluations without a better log-loss "
        "(evaluating every epoch unless --eval-every says otherwise)",
    )
    g.add_argument(
        "--target-auc",
        type=float,
        default=None,
        metavar="AUC",
        help="stop once a validation reaches this AUC (MLPerf's target: 0.80275); evaluating every "
        "epoch unless --eval-every says otherwise",
    )
    g.add_argument(
        "--validation-data",
        type=_data_spec,
        default=None,
        help="validate on these files (same forms as --data) instead of the training data's last part",
    )
    g.add_argument(
        "--validation",
        type=_fraction,
        default=0.1,
        metavar="FRACTION",
        help="the last FRACTION of the training data, held apart for --eval-every and --early-stop",
    )
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the embedding tables")
    p.add_argument(
        "--lr-schedule",
        choices=[d.value for d in Decay],
        default="constant",
        help="the tables' learning rate over the run: constant, or decayed to 0 at the last step "
        "along a half cosine or a line (after --lr-warmup)",
    )
    p.add_argument(
        "--lr-warmup",
        type=int,
        default=0,
        metavar="STEPS",
        help="the tables' learning rate rises linearly to --lr over the first STEPS steps",
    )
    p.add_argument(
        "--optimizer", default=OptimizerKind.ROWWISE_ADAGRAD.value, choices=[k.value for k in OptimizerKind]
    )
    p.add_argument(
        "--init", default="normal", choices=["normal", "uniform"], help="table init (default scales)"
    )
    p.add_argument("--dense-optimizer", default="adamw", choices=list(DENSE_OPTIMIZERS))
    p.add_argument("--dense-lr", type=float, default=1e-2)
    p.add_argument("--dense-lr-schedule", choices=list(SCHEDULES), default="cosine")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="L2 on the rows a batch touches")
    p.add_argument("--dense-weight-decay", type=float, default=1.0, help="dense weight decay (AdamW's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bottom-mlp", type=_int_list, default=None, help="default: 64,<embedding-dim>")
    p.add_argument("--top-mlp", type=_int_list, default=(64, 32, 1))
    p.add_argument("--cross-layers", type=_positive_int, default=2, help="DCNv2 only")
    p.add_argument("--cross-rank", type=_positive_int, default=32, help="DCNv2 only")
    p.add_argument(
        "--kernels",
        choices=list(KERNELS),
        default="auto",
        help="the lookup and the sparse update (on one device, and on the owners of sharded "
        "tables) through the Pallas kernels (auto: on GPU and TPU; pallas: anywhere, interpreted on "
        "CPU), the CPU kernels (auto: on CPU when built; cpu: required) or the XLA path (xla)",
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bitwise-repeatable steps: on GPU, XLA's scatter-adds and reductions without "
        "atomics (--xla_gpu_deterministic_ops; the Pallas kernels are deterministic anyway); "
        "CPU and TPU steps are deterministic either way",
    )
    p.add_argument(
        "--table-dtype",
        choices=list(SHORT_NAMES),
        default="fp32",
        help="embedding table storage; bf16/fp16 tables are updated with stochastic rounding "
        "(deterministic given --seed)",
    )
    p.add_argument(
        "--dense-dtype",
        choices=list(DENSE_DTYPE_NAMES),
        default="fp32",
        help="the dense layers' matmuls: bf16 is mixed precision (fp32 parameters, products "
        "accumulated in fp32), fast on bf16 matrix units (CPU AMX, GPU tensor cores)",
    )
    p.add_argument(
        "--state-dtype",
        choices=list(SHORT_NAMES),
        default="fp32",
        help="the tables' optimizer state, updated in fp32 and stored with stochastic rounding; "
        "bf16 halves its memory (fp16 saturates at 65504 and loses Adam's v below 2^-24)",
    )


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        type=_data_spec,
        default="synthetic",
        help="synthetic, criteo:PATH, libfm:PATH, csv:PATH or parquet:PATH (PATH: file, glob or a,b,c; "
        "criteo:DIR reads a preprocessed directory)",
    )
    p.add_argument("--eval-data", type=_data_spec, default=None, help="same forms; default: a held-out tail")
    p.add_argument("--holdout", type=_fraction, default=0.2, help="held-out fraction without --eval-data")
    g = p.add_argument_group("columns (csv/parquet)")
    g.add_argument("--label", default="label", help="label column (0/1)")
    g.add_argument("--dense", type=_name_list, default=(), help="dense columns, comma-separated")
    g.add_argument("--sparse", type=_name_list, default=None, help="sparse columns; default: all others")
    g.add_argument("--ignore", type=_name_list, default=(), help="columns left out of the default sparse set")
    g.add_argument("--multi-hot-sep", default=None, help="split sparse fields into bags on this, e.g. '|'")
    g.add_argument(
        "--sequence",
        type=_name_list,
        default=(),
        help="sparse columns read as histories: looked up unpooled, for --model din's attention",
    )
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


def _sharding_flags(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--device-memory",
        default=None,
        metavar="SIZE",
        help="--sharding auto: plan for SIZE per device (16GB, 512MiB); tables that do not fit "
        "are cached over host memory, at cache sizes the training data's ids suggest",
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
        "directions left out stay fp32; ids=packed sends ids in their fewest bytes (lossless)",
    )
    g.add_argument(
        "--pipeline",
        choices=[m.value for m in Pipeline],
        default="sparse_dist",
        help="sparse_dist: each step also sends the next batch's ids to their tables' owners, "
        "beside its own update (exact; TorchRec's TrainPipelineSparseDist); semi_sync: each "
        "step looks the next batch up before its own update (not exact: rows one update late); "
        "none: each step routes its own ids first. One device and cached tables route no ids ahead",
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


def _cache_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cache (tables in host memory, hot rows on the devices; one process)")
    g.add_argument(
        "--cache-load-factor",
        default=None,
        metavar="F|TABLE=F,...",
        help="cache tables: the fraction of rows the device holds, for every table (0.2) or "
        "by table (t0=0.1,t3=0.5); the others stay whole on the device",
    )
    g.add_argument("--cache-policy", choices=[p.value for p in CachePolicy], default="lookahead")
    g.add_argument(
        "--prefetch-depth",
        type=_positive_int,
        default=32,
        metavar="K",
        help="upcoming batches the lookahead policy sees (the next batch's misses are always "
        "fetched while the current step runs)",
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None)
    g.add_argument("--checkpoint-every", type=_positive_int, default=1000, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=_positive_int, default=2, help="newest checkpoints kept")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--metrics-out", default=None, help="write final metrics as JSON here")
    p.add_argument(
        "--log-dir",
        default=None,
        help="write the training curves (loss, samples/s, evaluation metrics) as TensorBoard event files here",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="write a jax.profiler trace of STEPS train steps after the first to --profile-dir",
    )
    p.add_argument("--profile-dir", default="profile", help="where --profile writes its trace")
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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
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


def _comm_config(text: str) -> CommConfig:
    try:
        return CommConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
