"""The run's summary on stdout, and its metrics file."""

from __future__ import annotations

import json

from recsys.cli.config import RunConfig


def report(config: RunConfig, result: dict) -> None:
    if result["compile_s"] is None:
        speed = "no steps trained in this run"
    else:
        speed = f"{result['samples_per_s'] or 0:.0f} samples/s (first step with compile {result['compile_s']:.1f}s)"
    print(
        f"\n{config.model} on {config.data}: {result['steps']} steps of {config.batch_size}, {speed}\n"
        f"  eval on {result['eval_samples']} samples: AUC {result['auc']:.4f}  log-loss "
        f"{result['logloss']:.4f}  NE {result['normalized_entropy']:.4f}\n"
        f"  train loss (last 10% of steps) {result['train_loss']:.4f}"
    )
    if result["eval_history"]:
        best = next(h for h in result["eval_history"] if h["step"] == result["best_step"])
        stopped = ", stopped early" if result["stopped_early"] else ""
        print(
            f"  state of step {result['best_step']}, the best of {len(result['eval_history'])} validations "
            f"on {result['validation_examples']} samples (AUC {best['auc']:.4f}  log-loss "
            f"{best['logloss']:.4f}){stopped}"
        )
    if "planted_auc" in result:
        print(
            f"  planted model on the same samples: AUC {result['planted_auc']:.4f}  "
            f"log-loss {result['planted_logloss']:.4f}"
        )
    for note in result["notes"]:
        print(f"  note: {note}")
    if config.metrics_out:
        with open(config.metrics_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"  metrics written to {config.metrics_out}")
