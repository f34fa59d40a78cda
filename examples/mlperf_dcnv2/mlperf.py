"""MLPerf Training DLRM-DCNv2 with recsys-train: materialize the data, then train to the target.

    python examples/mlperf_dcnv2/mlperf.py materialize --out /data/mlperf/train day_{0..22}
    python examples/mlperf_dcnv2/mlperf.py materialize --out /data/mlperf/eval day_23
    python examples/mlperf_dcnv2/mlperf.py train --data /data/mlperf --devices 8
    python examples/mlperf_dcnv2/mlperf.py train --data /data/mlperf --devices 8 --print   # the command only

Everything the benchmark fixes (tables, multi-hot sizes, model, optimizer, batch, the
evaluation cadence and the target) is read from config.json beside this file and turned
into `recsys-train` flags here; flags after `--` go to `recsys-train` as they are
(`--coordinator`, `--num-processes`, `--process-id` for several hosts). `--smoke` scales
the model and batch down for a CPU (smoke.sh).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parent / "config.json"
# The smoke run's model and batch: small enough for 8 simulated CPU devices in CI.
SMOKE = {
    "embedding_dim": 16,
    "bottom_mlp": [32, 16],
    "cross_rank": 16,
    "top_mlp": [64, 32, 1],
    "batch_size": 256,
}


def load_config(path: Path = CONFIG) -> dict:
    with open(path) as f:
        return json.load(f)


def eval_every(config: dict, batch_size: int) -> int:
    """MLPerf's cadence, in steps: every floor(samples in an epoch / (batch x evaluations))."""
    evaluation = config["evaluation"]
    return max(
        1, math.floor(evaluation["samples_in_an_epoch"] / (batch_size * evaluation["evaluations_per_epoch"]))
    )


def train_flags(config: dict, data: str, devices: int, smoke: bool = False) -> list[str]:
    """The `recsys-train` flags of the benchmark run on `data` (a directory holding the
    materialized `train` and `eval` directories) over `devices` devices."""
    model, optimizer = dict(config["model"]), config["optimizer"]
    batch = config["batch_size"]
    every = eval_every(config, batch)
    if smoke:
        model.update({k: v for k, v in SMOKE.items() if k != "batch_size"})
        batch, every = SMOKE["batch_size"], 10
    if optimizer["warmup_steps"] or optimizer["decay"] != "constant":
        raise ValueError("MLPerf DLRM-DCNv2 trains at a constant rate: no warm-up or decay")
    eval_dir = f"criteo:{data}/eval"
    flags = ["--data", f"criteo:{data}/train", "--eval-data", eval_dir, "--validation-data", eval_dir]
    flags += ["--model", model["name"], "--embedding-dim", str(model["embedding_dim"])]
    flags += ["--bottom-mlp", _ints(model["bottom_mlp"]), "--top-mlp", _ints(model["top_mlp"])]
    flags += ["--cross-layers", str(model["cross_layers"]), "--cross-rank", str(model["cross_rank"])]
    # Adagrad for the tables and the dense layers, at one constant rate, no weight decay;
    # tables start uniform at 1/sqrt(rows), as the reference's do.
    flags += [
        "--optimizer",
        optimizer["kind"],
        "--lr",
        str(optimizer["learning_rate"]),
        "--weight-decay",
        "0",
    ]
    flags += ["--dense-optimizer", optimizer["kind"], "--dense-lr", str(optimizer["learning_rate"])]
    flags += ["--dense-lr-schedule", "constant", "--dense-weight-decay", "0", "--init", "uniform"]
    flags += ["--batch-size", str(batch), "--epochs", str(config["evaluation"]["max_epochs"])]
    flags += ["--eval-every", str(every), "--target-auc", str(config["target_auc"])]
    flags += ["--devices", str(devices), "--sharding", "auto"]
    return flags


def materialize(args) -> int:
    from recsys.data.multihot import materialize_multihot

    config = load_config(args.config)
    caps = [min(r, args.row_cap) if args.row_cap else r for r in config["data"]["row_caps"]]
    materialize_multihot(
        ",".join(args.files),
        args.out,
        rows=caps,
        multi_hot_sizes=config["data"]["multi_hot_sizes"],
        seed=config["data"]["multi_hot_seed"],
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    return 0


def train(args, extra: list[str]) -> int:
    config = load_config(args.config)
    flags = train_flags(config, args.data, args.devices, smoke=args.smoke) + extra
    if args.print:
        print(shlex.join(["recsys-train", *flags]))
        return 0
    from recsys import train as cli

    return cli.main(flags)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("materialize", help="Criteo 1TB day files -> the multi-hot binary form")
    m.add_argument("--out", required=True)
    m.add_argument("--row-cap", type=int, default=None, help="cap every table below MLPerf's (smoke runs)")
    m.add_argument("files", nargs="+", help="Criteo TSV day files")
    t = sub.add_parser("train", help="train to the target AUC (flags after -- go to recsys-train)")
    t.add_argument("--data", required=True, help="a directory holding the materialized train/ and eval/")
    t.add_argument("--devices", type=int, required=True, help="all devices of all hosts")
    t.add_argument("--smoke", action="store_true", help="a small model and batch (CPU)")
    t.add_argument("--print", action="store_true", help="print the recsys-train command and stop")
    args = p.parse_args(argv)
    return materialize(args) if args.command == "materialize" else train(args, extra)


def _ints(values) -> str:
    return ",".join(str(v) for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
