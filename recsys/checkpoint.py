"""Checkpoints of the train state with orbax, in a plan-independent (logical) form.

Tables and their optimizer slots are saved per logical table (`[rows, dim]`), never in
the stacked layout, so a checkpoint survives a change of stacking or sharding. Alongside
the arrays a JSON record describes the model (every table, feature and dense parameter
shape) and carries the caller's metadata (data position, loss history, run settings);
restoring into a differently configured model raises `CheckpointMismatch` naming each
difference instead of failing somewhere inside orbax.

Orbax writes a step into a temporary directory and renames it into place only once it
is complete, so a crash mid-save leaves the previous checkpoint as the latest good one
(the partial directory is ignored and removed on the next save).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from mesh import relayout
from recsys.embedding import EmbeddingTable, find_collection
from recsys.layout import build_layout
from recsys.lookup import stack_tables
from recsys.sharded_trainer import ShardedState, ShardedTrainer
from recsys.trainer import Trainer, TrainState


class CheckpointMismatch(ValueError):
    """A checkpoint was written for a different model or run configuration."""


def describe_model(trainer: Trainer, state: TrainState) -> dict:
    """A JSON description of everything whose shape a checkpoint depends on."""
    config = trainer.config
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
        "/".join(map(str, path)): [list(x.shape), str(x.dtype)]
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state.params))
        for path in [tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)]
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


def to_logical(trainer: Trainer | ShardedTrainer, state: TrainState | ShardedState) -> dict:
    """The train state with tables and slots per logical table.

    One device: host NumPy copies (the next train step donates the device buffers of
    `state`, so an asynchronous save must not read them). Sharded: device arrays, every
    table `[rows, dim]` split over the devices (`mesh.sharded.logical_sharding`), so orbax
    writes the shards in parallel and no process holds a whole table.
    """
    if isinstance(trainer, ShardedTrainer):
        return _sharded_to_logical(trainer, state)
    layout = build_layout(trainer.config)
    stacked = trainer.stacked_tables(state)
    tables, slots = {}, {}
    for group in layout.table_groups:
        for spec, offset in zip(group.tables, group.row_offsets):
            tables[spec.name] = stacked[group.name][offset : offset + spec.rows]
            slots[spec.name] = {k: v[offset : offset + spec.rows] for k, v in state.slots[group.name].items()}
    tree = {
        "step": state.step,
        "params": nnx.to_pure_dict(state.params),
        "rest": nnx.to_pure_dict(state.rest),
        "opt_state": state.opt_state,
        "tables": tables,
        "slots": slots,
    }
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _sharded_to_logical(trainer: ShardedTrainer, state: ShardedState) -> dict:
    mesh, layout = trainer.mesh, trainer.layout
    copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # fresh buffers: the state is donated next step
    tables, slots = {}, {t: {} for t in layout.table_shapes}
    for g in layout.groups:
        tables.update(relayout.to_logical(layout, g.name, state.tables[g.name], mesh))
        for kind, storage in state.slots[g.name].items():
            for table, value in relayout.to_logical(layout, g.name, storage, mesh).items():
                slots[table][kind] = value
    return {
        "step": copy(state.step),
        "params": copy(nnx.to_pure_dict(state.params)),
        "rest": copy(nnx.to_pure_dict(state.rest)),
        "opt_state": copy(state.opt_state),
        "tables": tables,
        "slots": slots,
    }


def _sharded_from_logical(trainer: ShardedTrainer, template: ShardedState, tree: dict) -> ShardedState:
    mesh, layout = trainer.mesh, trainer.layout
    params = jax.tree.map(lambda x: x, template.params)
    nnx.replace_by_pure_dict(params, tree["params"])
    rest = jax.tree.map(lambda x: x, template.rest)
    nnx.replace_by_pure_dict(rest, tree["rest"])
    tables, slots = {}, {}
    for g in layout.groups:
        tables[g.name] = relayout.from_logical(layout, g.name, tree["tables"], mesh)
        slots[g.name] = {
            kind: relayout.from_logical(layout, g.name, {t: tree["slots"][t][kind] for t in g.tables}, mesh)
            for kind in template.slots[g.name]
        }
    return ShardedState(
        step=tree["step"],
        params=params,
        rest=rest,
        opt_state=tree["opt_state"],
        tables=tables,
        slots=slots,
        routing_fallbacks=template.routing_fallbacks,
    )


def from_logical(trainer: Trainer | ShardedTrainer, template, tree: dict):
    """Inverse of `to_logical`, laid out like `template` (this run's stacking or plan)."""
    if isinstance(trainer, ShardedTrainer):
        return _sharded_from_logical(trainer, template, tree)
    layout = build_layout(trainer.config)
    model = trainer.model(template)
    find_collection(model).set_stacked_tables(stack_tables(trainer.config, tree["tables"]))
    _, table_state, _ = nnx.split(model, EmbeddingTable, ...)
    slots = {}
    for group in layout.table_groups:
        names = [t.name for t in group.tables]
        slots[group.name] = {
            k: jax.numpy.concatenate([jax.numpy.asarray(tree["slots"][n][k]) for n in names])
            for k in template.slots[group.name]
        }
    params = jax.tree.map(lambda x: x, template.params)
    nnx.replace_by_pure_dict(params, tree["params"])
    rest = jax.tree.map(lambda x: x, template.rest)
    nnx.replace_by_pure_dict(rest, tree["rest"])
    return TrainState(
        step=jax.numpy.asarray(tree["step"]),
        params=jax.tree.map(jax.numpy.asarray, params),
        tables=table_state,
        rest=jax.tree.map(jax.numpy.asarray, rest),
        slots=slots,
        opt_state=jax.tree.map(jax.numpy.asarray, tree["opt_state"]),
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

    def save(
        self, step: int, trainer: Trainer | ShardedTrainer, state: TrainState | ShardedState, metadata: dict
    ) -> None:
        """Starts an asynchronous save of `state` at `step`; returns once copies of it exist."""
        record = {"model": describe_model(trainer, state), "metadata": metadata}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(to_logical(trainer, state)), record=ocp.args.JsonSave(record)
            ),
            force=True,
        )

    def read_metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]

    def restore(
        self, trainer: Trainer | ShardedTrainer, template: TrainState | ShardedState, step: int | None = None
    ) -> tuple[TrainState | ShardedState, dict]:
        """(the train state, the saved metadata) of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        record = self.read_metadata(step)
        check_compatible(
            record["model"], describe_model(trainer, template), self.directory, "model configuration"
        )
        target = to_logical(trainer, template)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
        return from_logical(trainer, template, restored), record["metadata"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
