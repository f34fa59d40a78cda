"""The default flags across datasets: test AUC and log-loss of each model, every run with
`--epochs 10 --early-stop 2` and otherwise default flags (the data's own flags aside).

    python -m benchmarks.defaults                                  # dlrm and lr everywhere
    python -m benchmarks.defaults --models dlrm dcnv2 lr fm deepfm wide_deep
    python -m benchmarks.defaults --datasets criteo --grid lr=0.05,0.1 weight-decay=0,1e-3

Datasets (the research data is read from ../shared/data and never copied; a dataset
whose files are absent is skipped, saying so):
  frappe     trains on frappe.validation.libfm, evaluates on frappe.test.libfm
  criteo     kaggle_train_10k.tsv, the last 20% held out for evaluation
  avazu      train_10k.csv (label click, id ignored), the last 20% held out
  synthetic  the planted-model data (the CLI's default run)
Early stopping and the best state come from a validation split, the last 10% of the
training data; the evaluation data is read once, at the end.

`--grid FLAG=V1,V2 ...` (flags without their dashes) tunes: it runs every combination
and ranks them by validation log-loss (the best in each run's history), never by the
evaluation data. One JSON line
per run; then per dataset and model (and grid point) the mean over seeds, and per dataset
whether the default model beats logistic regression on the test AUC and log-loss.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXED = ["--epochs", "10", "--early-stop", "2", "--no-progress"]


def dataset_args(name: str, data: Path) -> list[str] | None:
    """The flags that read `name`, or None (with a note) when its files are absent."""
    files = {
        "frappe": [data / "frappe" / "frappe.validation.libfm", data / "frappe" / "frappe.test.libfm"],
        "criteo": [data / "criteo" / "kaggle_train_10k.tsv"],
        "avazu": [data / "avazu" / "train_10k.csv"],
        "synthetic": [],
    }[name]
    missing = [f for f in files if not f.exists()]
    if missing:
        print(
            f"skipping {name}: {missing[0]} is absent (the research data is not redistributed)",
            file=sys.stderr,
        )
        return None
    if name == "frappe":
        return ["--data", f"libfm:{files[0]}", "--eval-data", f"libfm:{files[1]}"]
    if name == "criteo":
        return ["--data", f"criteo:{files[0]}"]
    if name == "avazu":
        return ["--data", f"csv:{files[0]}", "--label", "click", "--ignore", "id"]
    return ["--data", "synthetic"]


def grid_points(grid: list[str]) -> list[list[str]]:
    """`["lr=0.05,0.1", "weight-decay=0"]` -> the flag lists of every combination."""
    axes = []
    for item in grid:
        flag, sep, values = item.partition("=")
        if not sep or not flag or flag.startswith("-"):
            raise SystemExit(f"--grid takes FLAG=V1,V2,... (the flag without its dashes), got {item!r}")
        axes.append([[f"--{flag}", v] for v in values.split(",")])
    return [sum(combo, []) for combo in itertools.product(*axes)] if axes else [[]]


def run(argv: list[str], out: Path) -> dict:
    from recsys import train

    if train.main([*argv, "--metrics-out", str(out)]) != 0:
        raise SystemExit(f"failed: recsys-train {' '.join(argv)}")
    r = json.loads(out.read_text())
    best = next(h for h in r["eval_history"] if h["step"] == r["best_step"])
    return {
        "auc": r["auc"],
        "logloss": r["logloss"],
        "validation_auc": best["auc"],
        "validation_logloss": best["logloss"],
        "best_step": r["best_step"],
        "steps": r["steps"],
        "stopped_early": r["stopped_early"],
        "train_examples": r["train_examples"],
    }


def summarize(dataset: str, model: str, point: list[str], runs: list[dict]) -> dict:
    summary = {
        "dataset": dataset,
        "model": model,
        "flags": " ".join(point),
        "summary": True,
        "seeds": len(runs),
    }
    for key in ("auc", "logloss", "validation_auc", "validation_logloss", "best_step"):
        summary[key] = statistics.mean(r[key] for r in runs)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["frappe", "criteo", "avazu", "synthetic"],
        choices=["frappe", "criteo", "avazu", "synthetic"],
    )
    p.add_argument("--models", nargs="+", default=["dlrm", "lr"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--grid", nargs="*", default=[], metavar="FLAG=V1,V2")
    p.add_argument("--data", type=Path, default=DATA, help="where the shared research data lies")
    p.add_argument("--out", type=Path, default=Path("defaults_runs"), help="metrics files go here")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    points = grid_points(args.grid)
    for dataset in args.datasets:
        data = dataset_args(dataset, args.data)
        if data is None:
            continue
        summaries = []
        for model, point in itertools.product(args.models, points):
            runs = []
            for seed in args.seeds:
                name = "_".join([dataset, model, *(x.strip("-") for x in point), str(seed)])
                argv_ = [*data, *FIXED, "--model", model, "--seed", str(seed), *point]
                record = {"dataset": dataset, "model": model, "flags": " ".join(point), "seed": seed}
                record.update(run(argv_, args.out / f"{name}.json"))
                runs.append(record)
                print(json.dumps(record), flush=True)
            summaries.append(summarize(dataset, model, point, runs))
        for summary in sorted(summaries, key=lambda s: s["validation_logloss"]):
            print(json.dumps(summary), flush=True)
        plain = {s["model"]: s for s in summaries if not s["flags"]}
        if "dlrm" in plain and "lr" in plain:
            dlrm, lr = plain["dlrm"], plain["lr"]
            beats = dlrm["auc"] > lr["auc"] and dlrm["logloss"] < lr["logloss"]
            print(json.dumps({"dataset": dataset, "default_beats_lr": beats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
