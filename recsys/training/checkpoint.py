"""Checkpoints of the train state with orbax, in a plan-independent (logical) form.

Tables and their optimizer slots are saved per logical table (`[rows, dim]`), never in
the stacked layout, so a checkpoint survives a change of stacking or sharding. Alongside
the arrays a JSON record describes the model (every table, feature and dense parameter
shape) and carries the caller's metadata (data position, loss history, run settings);
restoring into a differently configured model raises `CheckpointMismatch` naming each
difference instead of failing somewhere inside orbax.

Orbax writes a step into a temporary directory and renames it into place only once it
is complete, so a crash mid-save leaves the last complete checkpoint as the latest
(the partial directory is ignored and removed on the next save).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from recsys.specs import EmbeddingConfig


class CheckpointMismatch(ValueError):
    """A checkpoint was written for a different model or run configuration."""


def describe_model(config: EmbeddingConfig, logical: dict) -> dict:
    """A JSON description of everything whose shape a checkpoint depends on: every table,
    feature and dense parameter (`logical`: a trainer's `to_logical` tree)."""
    tables = {
        t.name: {
            "rows": t.rows,
            "dim": t.dim,
            "dtype": t.dtype,
            "optimizer": t.optimizer.kind.value,
            # Only when not the default, so checkpoints from before the option still match.
            **({"state_dtype": t.optimizer.state_dtype} if t.optimizer.state_dtype != "float32" else {}),
        }
        for t in config.tables
    }
    features = {
        f.name: {"table": f.table, "max_ids": f.max_ids, "pooling": f.pooling.value} for f in config.features
    }
    dense = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): [list(x.shape), str(x.dtype)]
        for path, x in jax.tree_util.tree_leaves_with_path(logical["params"])
    }
    return {"tables": tables, "features": features, "dense_params": dense}


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}{key}"
        if key not in current:
            out.append(f"{name}: in the checkpoint, not in this run")
        elif key not in saved:
            out.append(f"{name}: in this run, not in the checkpoint")
        elif isinstance(saved[key], dict) and isinstance(current[key], dict):
            out.extend(_differences(saved[key], current[key], f"{name}."))
        elif saved[key] != current[key]:
            out.append(f"{name}: checkpoint {saved[key]!r}, this run {current[key]!r}")
    return out


def check_compatible(saved: dict, current: dict, directory: str, what: str) -> None:
    """Raises CheckpointMismatch listing every difference between two descriptions."""
    diffs = _differences(saved, current)
    if diffs:
        shown = "\n  ".join(diffs[:20]) + (f"\n  ... and {len(diffs) - 20} more" if len(diffs) > 20 else "")
        raise CheckpointMismatch(
            f"the checkpoint in {directory} was written for a different {what}:\n  {shown}\n"
            "use a fresh --checkpoint-dir to start over"
        )


class Checkpointer:
    """Saves every N steps (and on request), keeps the newest `keep`, restores the latest."""

    def __init__(self, directory: str, *, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, trainer, state, metadata: dict) -> None:
        """Starts an asynchronous save of `state` (a state of `trainer`: any trainer of the
        protocol in `recsys.training`) at `step`; returns once copies of it exist."""
        logical = trainer.to_logical(state)
        record = {"model": describe_model(trainer.config, logical), "metadata": metadata}
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(logical), record=ocp.args.JsonSave(record)),
            force=True,
        )

    def read_metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def restore(self, trainer, template, step: int | None = None) -> tuple[object, dict]:
        """(the train state, the saved metadata) of `step` (default: the latest), laid out
        like `template` (a state of `trainer`, which may stack or shard the tables in
        another way than the run that saved)."""
        step = self.latest_step() if step is None else step
        record = self.read_metadata(step)
        target = trainer.to_logical(template)
        check_compatible(
            record["model"], describe_model(trainer.config, target), self.directory, "model configuration"
        )
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        return trainer.from_logical(template, restored), record["metadata"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
