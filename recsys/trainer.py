"""The split train step: lookup -> dense forward/backward -> sparse update -> optax update.

Autodiff only ever sees the dense parameters and the activations; the tables are
updated by `sparse_update` from the activation gradients, touching only the rows the
batch looked up. Everything runs in one `jax.jit` with the train state donated.

The model is any NNX module `model(dense, sparse) -> logits [batch]` that contains one
`EmbeddingCollection` and hands its sparse input to it. Non-parameter state other than
the tables (e.g. batch statistics) is carried through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from recsys.embedding import EmbeddingTable, find_collection
from recsys.lookup import lookup
from recsys.models.mlp import cpu_dense_kernels, dense_path
from recsys.sparse import JaggedBatch
from recsys.sparse_update import init_slots, sparse_update
from recsys.specs import EmbeddingConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    dense: jax.Array  # [batch, dense_features] float32
    sparse: JaggedBatch
    labels: jax.Array  # [batch] float32 in {0, 1}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # scalar int32: updates applied so far
    params: nnx.State  # dense parameters (optax)
    tables: nnx.State  # EmbeddingTable variables (sparse optimizer)
    rest: nnx.State  # any other model state, passed through
    slots: dict  # {table group: sparse optimizer slot arrays}
    opt_state: optax.OptState


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


class Trainer:
    """Builds the train state from a model and compiles the split train step."""

    def __init__(
        self,
        model: nnx.Module,
        dense_optimizer: optax.GradientTransformation,
        *,
        loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = binary_cross_entropy,
        dedup: str = "auto",
        kernels: str = "auto",
    ):
        """`dedup` and `kernels` choose how the sparse update runs (`sparse_update`);
        `kernels` also chooses where float32 dense layers run (`recsys.models.mlp.dense_path`)."""
        self.config: EmbeddingConfig = find_collection(model).config
        self.graphdef, tables, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
        self._initial = (tables, params, rest)
        self.dense_optimizer = dense_optimizer
        self.loss_fn = loss_fn
        self.dedup = dedup
        self.kernels = kernels
        self.dense_kernels = dense_path(kernels) == "cpu"
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict)

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

    def model(self, state: TrainState) -> nnx.Module:
        """The NNX model holding `state`'s values (for evaluation or export)."""
        return nnx.merge(self.graphdef, state.tables, state.params, state.rest)

    def stacked_tables(self, state: TrainState) -> dict[str, jax.Array]:
        return find_collection(self.model(state)).stacked_tables()

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, jax.Array]:
        with cpu_dense_kernels(self.dense_kernels):  # while the step is traced
            return self._traced_train_step(state, batch)

    def _traced_train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, jax.Array]:
        model = self.model(state)
        collection = find_collection(model)
        tables = collection.stacked_tables()
        acts = lookup(self.config, tables, batch.sparse, self.kernels)

        def loss_of(params, acts):
            logits = nnx.merge(self.graphdef, state.tables, params, state.rest)(batch.dense, acts)
            return self.loss_fn(logits, batch.labels)

        loss, (param_grads, act_grads) = jax.value_and_grad(loss_of, argnums=(0, 1))(state.params, acts)
        new_tables, slots = sparse_update(
            self.config,
            tables,
            state.slots,
            batch.sparse,
            act_grads,
            state.step,
            dedup=self.dedup,
            kernels=self.kernels,
        )
        collection.set_stacked_tables(new_tables)
        updates, opt_state = self.dense_optimizer.update(param_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        _, table_state, _ = nnx.split(model, EmbeddingTable, ...)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            tables=table_state,
            rest=state.rest,
            slots=slots,
            opt_state=opt_state,
        )
        return new_state, loss

    def _predict(self, state: TrainState, dense: jax.Array, sparse: JaggedBatch) -> jax.Array:
        """Probabilities [batch], looking the ids up through the model's collection."""
        with cpu_dense_kernels(self.dense_kernels):
            return jax.nn.sigmoid(self.model(state)(dense, sparse))
