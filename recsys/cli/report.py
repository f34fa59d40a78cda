"""The run's summary on stdout, and its metrics file."""

from __future__ import annotations

import json

from recsys.cli.config import RunConfig


def report(config: RunConfig, result: dict) -> None:
    print(
        f"\n{config.model} on {config.data}: {result['steps']} steps of {config.batch_size}, "
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
    if config.metrics_out:
        with open(config.metrics_out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"  metrics written to {config.metrics_out}")
