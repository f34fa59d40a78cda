"""The split train step on one device: lookup -> dense forward/backward -> sparse update
-> optax update.

Autodiff only ever sees the dense parameters and the activations; the tables are
updated by `sparse_update` from the activation gradients, touching only the rows the
batch looked up. Everything runs in one `jax.jit` with the train state donated.

The model is any NNX module `model(dense, sparse) -> outputs` (an array or any pytree)
that contains one `EmbeddingCollection` and hands its sparse input to it. The model's
other state (batch statistics, dropout RNG counts) is updated by every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mesh.collectives.ordering import depend
from recsys import kernels as kernel_paths
from recsys.batching import Batch
from recsys.embedding import EmbeddingTable, find_collection
from recsys.layout import build_layout
from recsys.lookup import lookup, stack_tables
from recsys.sparse import JaggedBatch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig
from recsys.training.losses import LossFn, binary_cross_entropy, mean_loss
from recsys.training.pipeline import Pipeline


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # scalar int32: updates applied so far
    params: nnx.State  # dense parameters (optax)
    tables: nnx.State  # EmbeddingTable variables (sparse optimizer)
    rest: nnx.State  # the model's other state (batch statistics, RNG counts)
    slots: dict  # {table group: sparse optimizer slot arrays}
    opt_state: optax.OptState
    # {table group: [rows] int32}: the row each stored row rounds as (`sparse_update`'s
    # row_keys; a cached table's slots round as their ids). Empty: every row itself.
    row_keys: dict = dataclasses.field(default_factory=dict)


class Trainer:
    """Builds the train state from a model and compiles the split train step.

    Every trainer (`ShardedTrainer` too) offers the same protocol, which the checkpoints
    and the CLI rely on: `init_state()`, `place_batch(batch)`, `train_step(state, batch)
    -> (state, loss)`, `predict(state, dense, sparse)`, `logical_tables(state)`, and
    `to_logical(state)` / `from_logical(template, tree)` for plan-independent checkpoints.

    Args:
      model: an NNX module holding one `EmbeddingCollection`.
      dense_optimizer: optax transformation of the dense parameters.
      loss_fn: `(outputs, batch) -> [batch]` per-sample losses (`recsys.training.losses`);
        the step minimizes their mean, weighted by `batch.weights` when given.
      predict_fn: `outputs -> predictions`, what `predict` returns (sigmoid: click
        probabilities of a logit).
      dedup: the sparse update's dedup ("auto", "marker", "sort"; `sparse_update`).
      kernels: "auto", "xla", "cpu" or "pallas" (`recsys.kernels`): the lookup, the sparse
        update and, on CPU, the float32 dense layers.
      logical_rows: {table: rows} when the model's tables hold fewer rows than the tables
        they stand for (`recsys.cache`: slots); `sparse_update` decides as for those.
      pipeline: "none", "sparse_dist" or "semi_sync" (`recsys.training.pipeline`). One
        device routes no ids: "sparse_dist" is "none" here. "semi_sync" looks up each
        next batch before the step's update (`pipelined_step`).
    """

    def __init__(
        self,
        model: nnx.Module,
        dense_optimizer: optax.GradientTransformation,
        *,
        loss_fn: LossFn = binary_cross_entropy,
        predict_fn: Callable = jax.nn.sigmoid,
        dedup: str = "auto",
        kernels: str = "auto",
        logical_rows: dict[str, int] | None = None,
        pipeline: Pipeline | str = Pipeline.SPARSE_DIST,
    ):
        # Nothing to route ahead on one device: sparse_dist is the plain step.
        self.pipeline = Pipeline.NONE if Pipeline(pipeline) is Pipeline.SPARSE_DIST else Pipeline(pipeline)
        self.config: EmbeddingConfig = find_collection(model).config
        self.logical_rows = logical_rows
        self.graphdef, tables, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
        self._initial = (tables, params, rest)
        self.dense_optimizer = dense_optimizer
        self.loss_fn, self.predict_fn = loss_fn, predict_fn
        self.dedup = dedup
        self.kernels = kernels
        groups = build_layout(self.config).table_groups
        kernel_paths.verify(((g.dtype, g.dim, g.optimizer) for g in groups), kernels)
        self.dense_kernels = kernel_paths.dense_path(kernels) == "cpu"
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict)
        if self.pipeline is Pipeline.SEMI_SYNC:
            self.carry_step = jax.jit(self._lookup)
            self.pipelined_step = jax.jit(self._semi_sync_step, donate_argnums=(0, 1))

    def init_state(self) -> TrainState:
        # Copies: the step donates its state, and the model passed in must stay usable.
        tables, params, rest = jax.tree.map(jnp.copy, self._initial)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            tables=tables,
            rest=rest,
            slots=init_slots(self.config),
            opt_state=self.dense_optimizer.init(params),
        )

    def place_batch(self, batch: Batch) -> Batch:
        """A host batch (NumPy) on the device."""
        return jax.tree.map(jnp.asarray, batch)

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model holding `state`'s values (for evaluation or export)."""
        return nnx.merge(self.graphdef, state.tables, state.params, state.rest)

    def stacked_tables(self, state: TrainState) -> dict[str, jax.Array]:
        return find_collection(self.model(state)).stacked_tables()

    def logical_tables(self, state: TrainState) -> dict[str, np.ndarray]:
        """{table: [rows, dim]} on the host."""
        return jax.device_get(find_collection(self.model(state)).logical_tables())

    def to_logical(self, state: TrainState) -> dict:
        """The state with tables and slots per logical table, as host NumPy copies (the
        next step donates the device buffers, so an asynchronous save must not read them)."""
        layout = build_layout(self.config)
        stacked = self.stacked_tables(state)
        tables, slots = {}, {}
        for group in layout.table_groups:
            for spec, offset in zip(group.tables, group.row_offsets):
                rows = slice(offset, offset + spec.rows)
                tables[spec.name] = stacked[group.name][rows]
                slots[spec.name] = {k: v[rows] for k, v in state.slots[group.name].items()}
        tree = {
            "step": state.step,
            "params": nnx.to_pure_dict(state.params),
            "rest": nnx.to_pure_dict(state.rest),
            "opt_state": state.opt_state,
            "tables": tables,
            "slots": slots,
        }
        return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))

    def from_logical(self, template: TrainState, tree: dict) -> TrainState:
        """Inverse of `to_logical`, stacked like `template`."""
        layout = build_layout(self.config)
        model = self.model(template)
        find_collection(model).set_stacked_tables(stack_tables(self.config, tree["tables"]))
        _, table_state, _ = nnx.split(model, EmbeddingTable, ...)
        slots = {
            group.name: {
                k: jnp.concatenate([jnp.asarray(tree["slots"][t.name][k]) for t in group.tables])
                for k in template.slots[group.name]
            }
            for group in layout.table_groups
        }
        return TrainState(
            step=jnp.asarray(tree["step"]),
            params=jax.tree.map(jnp.asarray, replaced(template.params, tree["params"])),
            tables=table_state,
            rest=jax.tree.map(jnp.asarray, replaced(template.rest, tree["rest"])),
            slots=slots,
            opt_state=jax.tree.map(jnp.asarray, tree["opt_state"]),
        )

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, jax.Array]:
        with kernel_paths.cpu_dense_layers(self.dense_kernels):  # while the step is traced
            return self._traced_train_step(state, batch, self._lookup(state, batch))

    def _lookup(self, state: TrainState, batch: Batch):
        return lookup(self.config, self.stacked_tables(state), batch.sparse, self.kernels)

    def _semi_sync_step(self, state: TrainState, acts, batch: Batch, next_batch: Batch):
        """The step on `batch` with its activations looked up in the step before; looks up
        `next_batch`'s first, from the tables before this step's update: (state, them, loss)."""
        next_acts = self._lookup(state, next_batch)
        with kernel_paths.cpu_dense_layers(self.dense_kernels):
            state, loss = self._traced_train_step(state, batch, acts, read_first=next_acts)
        return state, next_acts, loss

    def _traced_train_step(
        self, state: TrainState, batch: Batch, acts, read_first=None
    ) -> tuple[TrainState, jax.Array]:
        """The step on `acts`; `read_first`: a lookup of the same tables that the sparse
        update must follow (else XLA copies every table to keep it readable)."""
        model = self.model(state)
        collection = find_collection(model)
        tables = collection.stacked_tables()

        def loss_of(params, acts):
            # Fresh variables of this trace: the model updates its other state in place.
            rest = jax.tree.map(lambda x: x, state.rest)
            model = nnx.merge(self.graphdef, state.tables, params, rest)
            loss = mean_loss(self.loss_fn(model(batch.dense, acts), batch), batch.weights)
            return loss, nnx.split(model, EmbeddingTable, nnx.Param, ...)[3]

        (loss, rest), (param_grads, act_grads) = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)(
            state.params, acts
        )
        if read_first is not None:
            act_grads = depend(act_grads, read_first)
        new_tables, slots = sparse_update(
            self.config,
            tables,
            state.slots,
            batch.sparse,
            act_grads,
            state.step,
            dedup=self.dedup,
            kernels=self.kernels,
            row_keys=state.row_keys or None,
            logical_rows=self.logical_rows,
        )
        collection.set_stacked_tables(new_tables)
        updates, opt_state = self.dense_optimizer.update(param_grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            tables=nnx.split(model, EmbeddingTable, ...)[1],
            rest=rest,
            slots=slots,
            opt_state=opt_state,
            row_keys=state.row_keys,
        )
        return new_state, loss

    def _predict(self, state: TrainState, dense: jax.Array, sparse: JaggedBatch):
        """`predict_fn` of the model's outputs in evaluation mode (`nnx.Module.eval`:
        running batch statistics, no dropout), looking the ids up through its collection."""
        model = self.model(state)
        model.eval()
        with kernel_paths.cpu_dense_layers(self.dense_kernels):
            return self.predict_fn(model(dense, sparse))


def replaced(template: nnx.State, values: dict) -> nnx.State:
    """A copy of `template` holding `values` (a pure dict of the same structure)."""
    out = jax.tree.map(lambda x: x, template)
    nnx.replace_by_pure_dict(out, values)
    return out
