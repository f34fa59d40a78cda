"""The embedding collection as a Flax NNX module a user can put in their own model.

`EmbeddingCollection(config, rngs=...)` owns the stacked tables (as `EmbeddingTable`
variables, so the trainer can tell them from dense `nnx.Param`s) and maps a sparse
input to activations: `Activations`: `acts[feature]` is `[batch, dim]`
for pooled features and `[batch, max_ids, dim]` for sequence features.

It accepts either a `JaggedBatch` (it looks the ids up: evaluation, inference, a user's
own loop) or `Activations` (already looked up: the split train step does the
lookup itself, differentiates the model with respect to the activations, and applies
the sparse optimizer to the touched rows, so autodiff never sees a table). A user's
model only has to pass its sparse input through to the collection.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

from recsys.lookup import Activations, init_tables, lookup, unstack_tables
from recsys.sparse import JaggedBatch
from recsys.specs import EmbeddingConfig


class EmbeddingTable(nnx.Variable):
    """A stacked `[total_rows, dim]` table; updated by the sparse optimizer, not by optax."""


_init_keys: contextvars.ContextVar[list | None] = contextvars.ContextVar("table_init_keys", default=None)


@contextlib.contextmanager
def capture_init_keys():
    """Collects the key every EmbeddingCollection built inside draws its tables from.

    A sharded trainer builds the model inside `jit` within this block and draws each
    device's block of every table again from the key (`initial_tables`); the stacked
    tables the build made are then dead code that XLA drops.
    """
    keys: list = []
    token = _init_keys.set(keys)
    try:
        yield keys
    finally:
        _init_keys.reset(token)


class EmbeddingCollection(nnx.Module):
    def __init__(self, config: EmbeddingConfig, *, rngs: nnx.Rngs):
        self.config = config
        key = rngs.params()
        if (keys := _init_keys.get()) is not None:
            keys.append(key)
        stacked = init_tables(config, key)
        self.tables = nnx.Dict({name: EmbeddingTable(value) for name, value in stacked.items()})

    def stacked_tables(self) -> dict[str, jax.Array]:
        """{group: [total_rows, dim]} current values."""
        return {name: var.get_value() for name, var in self.tables.items()}

    def logical_tables(self) -> dict[str, jax.Array]:
        """{table: [rows, dim]}, independent of how tables are stacked."""
        return unstack_tables(self.config, self.stacked_tables())

    def set_stacked_tables(self, stacked: dict[str, jax.Array]) -> None:
        for name, value in stacked.items():
            self.tables[name].set_value(value)

    def __call__(self, sparse: JaggedBatch | Activations) -> Activations:
        if isinstance(sparse, Activations):
            missing = set(f.name for f in self.config.features) - set(sparse.features())
            if missing:
                raise ValueError(f"activations missing for features {sorted(missing)}")
            return sparse
        if not isinstance(sparse, JaggedBatch):
            raise TypeError(f"expected a JaggedBatch or Activations, got {type(sparse).__name__}")
        return lookup(self.config, self.stacked_tables(), sparse)


def find_collection(model: nnx.Module) -> EmbeddingCollection:
    """The one EmbeddingCollection inside `model` (the split train step needs exactly one)."""
    found = [node for _, node in nnx.iter_graph(model) if isinstance(node, EmbeddingCollection)]
    if len(found) != 1:
        raise ValueError(f"the model must contain exactly one EmbeddingCollection, found {len(found)}")
    return found[0]
