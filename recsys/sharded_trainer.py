"""The split train step with tables sharded over a mesh by a `ShardingPlan`.

Same step as `recsys.trainer.Trainer`: lookup -> dense forward/backward -> sparse update
-> optax, in one `jax.jit` with the state donated. The lookup and the sparse update run
under `jax.shard_map` (`mesh.sharded`, `recsys.sharded_update`); the dense part is plain
data parallelism: the batch is sharded over all mesh axes, the dense parameters and their
optimizer state are replicated, and their gradients are all-reduced under `shard_map` too
(the mean of the devices' mean losses is the mean over the whole batch, so they are
averaged as on one device). Every collective of the step is thus one of
`mesh.collectives`, and one chain orders them all (`mesh.collectives.ordering`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mesh import collectives
from mesh.plan import ShardingPlan
from mesh.relayout import from_logical
from mesh.sharded import gather_logical, logical_sharding, sharded_layout
from mesh.sharded_lookup import RoutingOptions, sharded_lookup
from recsys.embedding import EmbeddingTable, capture_init_keys, find_collection
from recsys.lookup import Activations, initial_tables, owner_bags
from recsys.sharded_update import (
    feature_routes,
    init_sharded_slots,
    logical_slots,
    routing_inputs,
    sharded_sparse_update,
)
from recsys.trainer import Batch, binary_cross_entropy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedState:
    step: jax.Array
    params: nnx.State  # replicated
    rest: nnx.State  # replicated
    opt_state: optax.OptState  # replicated
    tables: dict  # {group: sharded storage} (`mesh.sharded`)
    slots: dict  # {group: {slot: sharded storage}}
    # Steps whose bucketized routing overflowed and took the broadcast route (`mesh.bucketed`).
    routing_fallbacks: jax.Array


class ShardedTrainer:
    """Like `Trainer`, for a model whose tables are placed by `plan` on `mesh`.

    `model` is a module, or a function without arguments that builds one. Given a
    function, the model is never materialized on one device: `init_state` runs it under
    `jit` with every table's output split over the devices (each device draws only its
    block of the initial values) and moves the tables into the plan's layout piece by
    piece (`mesh.relayout`), so tables larger than any one device fit. The values equal
    those of the module the function builds.

    `kernels` chooses how the owners look up (`recsys.lookup.owner_bags`) and update
    (`recsys.sharded_update`) their rows: the Pallas embedding bag and fused update on GPU
    and TPU, the CPU kernels on CPU, or XLA.

    `loss_fn(logits, labels)` is a mean over the samples it is given: each device takes it
    over its own share of the batch, and the devices' means are averaged.
    """

    def __init__(
        self,
        model: nnx.Module | Callable[[], nnx.Module],
        dense_optimizer: optax.GradientTransformation,
        plan: ShardingPlan,
        mesh: jax.sharding.Mesh,
        *,
        loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = binary_cross_entropy,
        routing: RoutingOptions | None = None,
        kernels: str = "auto",
    ):
        self._build = None if isinstance(model, nnx.Module) else model
        if self._build is not None:
            model = nnx.eval_shape(self._build)  # shapes only: nothing is computed yet
        collection = find_collection(model)
        self.config, self.mesh, self.plan = collection.config, mesh, plan
        self.axes = tuple(mesh.axis_names)
        self.layout = sharded_layout(plan, self.config.tables, mesh)
        self.graphdef, tables, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
        # The dense forward gets looked-up activations, never the tables: empty stand-ins
        # keep the module structure without holding a second copy of every table.
        self._no_tables = jax.tree.map(lambda x: jnp.zeros((0, *x.shape[1:]), x.dtype), tables)
        self._initial = None if self._build else (collection.logical_tables(), params, rest)
        self.dense_optimizer, self.loss_fn = dense_optimizer, loss_fn
        self.features = feature_routes(self.config)
        self.routing = routing or RoutingOptions()
        # How owners look up (`recsys.lookup.owner_bags`) and update their rows
        # (`recsys.sharded_update.owner_update_path`).
        self.kernels = kernels
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.predict = jax.jit(self._predict)

    def init_state(self) -> ShardedState:
        replicated = NamedSharding(self.mesh, P())
        replicate = lambda tree: jax.device_put(tree, replicated)  # noqa: E731
        if self._build is None:
            logical, params, rest = self._initial
            params, rest = replicate(jax.tree.map(jnp.copy, params)), replicate(jax.tree.map(jnp.copy, rest))
        else:
            logical, params, rest = self.initial_program()()
        return ShardedState(
            step=replicate(jnp.zeros((), jnp.int32)),
            params=params,
            rest=rest,
            opt_state=replicate(self.dense_optimizer.init(params)),
            tables=self._place_tables(logical),
            slots=init_sharded_slots(self.config, self.layout, self.mesh),
            routing_fallbacks=replicate(jnp.zeros((), jnp.int32)),
        )

    def shard_batch(self, batch: Batch) -> Batch:
        """Places a global batch with its leading axis split over every device."""
        devices = self.mesh.devices.size
        if batch.labels.shape[0] % devices:
            raise ValueError(f"batch size {batch.labels.shape[0]} is not a multiple of the {devices} devices")
        return jax.device_put(batch, NamedSharding(self.mesh, P(self.axes)))

    def shard_local_batch(self, local: Batch) -> Batch:
        """Multi-process input: each process passes only its own samples (its devices' share
        of the global batch, in process order); no process ever holds the whole batch."""
        sharding = NamedSharding(self.mesh, P(self.axes))
        processes = jax.process_count()
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                sharding, x, (x.shape[0] * processes, *x.shape[1:])
            ),
            local,
        )

    def initial_program(self):
        """The jitted model build of `init_state`: (logical tables split over the devices,
        replicated dense parameters, the rest). Its compiled memory use is tested."""

        def build():
            with capture_init_keys() as keys:
                model = self._build()
            _, _, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
            # Drawn afresh per table: the stacked tables the build made are dead code.
            return initial_tables(self.config, keys[0]), params, rest

        spread = {t: logical_sharding(*shape, self.mesh) for t, shape in self.layout.table_shapes.items()}
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(build, out_shardings=(spread, replicated, replicated))

    def _place_tables(self, logical) -> dict[str, jax.Array]:
        """{table: [rows, dim]} -> {group: storage}: each table is split evenly over the
        devices first, then moved into the plan's layout on the devices."""
        out = {}
        for g in self.layout.groups:
            spread = {
                t: jax.device_put(logical[t], logical_sharding(*self.layout.table_shapes[t], self.mesh))
                for t in g.tables
            }
            out[g.name] = from_logical(self.layout, g.name, spread, self.mesh)
        return out

    def logical_tables(self, state: ShardedState):
        return gather_logical(self.layout, to_host(state.tables))

    def logical_slots(self, state: ShardedState):
        return logical_slots(self.layout, to_host(state.slots))

    def _lookup(self, state: ShardedState, sparse):
        """(activations, routed ids, the order of the collectives after the lookup)."""
        ids, coef = routing_inputs(self.config, sparse)
        bags = owner_bags(self.config, self.layout, self.kernels)
        return sharded_lookup(
            self.layout, state.tables, self.features, ids, coef, self.mesh, self.routing, bags
        )

    def _predict(self, state: ShardedState, dense: jax.Array, sparse) -> jax.Array:
        """Probabilities [batch] (batch sharded like a training batch)."""
        model = nnx.merge(self.graphdef, self._no_tables, state.params, state.rest)
        acts = Activations.from_features(self.config, self._lookup(state, sparse)[0])
        return jax.nn.sigmoid(model(dense, acts))

    def _train_step(self, state: ShardedState, batch: Batch) -> tuple[ShardedState, jax.Array]:
        acts, routed, order = self._lookup(state, batch.sparse)
        order, (loss, param_grads, act_grads) = self._dense_grads(state, batch, acts, order)
        tables, slots, _ = sharded_sparse_update(
            self.config,
            self.layout,
            self.mesh,
            state.tables,
            state.slots,
            routed,
            batch.sparse,
            act_grads,
            state.step,
            self.routing,
            self.kernels,
            order=order,
        )
        fell_back = jnp.zeros((), bool)  # any bucketized group took its overflow route
        for received in routed.values():
            if "fallback" in received:
                fell_back = fell_back | received["fallback"]
        updates, opt_state = self.dense_optimizer.update(param_grads, state.opt_state, state.params)
        new_state = ShardedState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            rest=state.rest,
            opt_state=opt_state,
            tables=tables,
            slots=slots,
            routing_fallbacks=state.routing_fallbacks + fell_back.astype(jnp.int32),
        )
        return new_state, loss

    def _dense_grads(self, state: ShardedState, batch: Batch, acts, order):
        """The dense backward per device, its gradients summed by `compressed_sum` (a plain
        float32 all-reduce unless `--comm allreduce` compresses it).

        Each device differentiates the mean loss of its own samples; the mean of the
        devices' means is the global mean loss (equal shares), so the dense gradients are
        the sum / devices and the activation gradients are scaled by 1/devices. All dense
        gradients travel as one flat vector: one all-reduce per step (compressed: one
        reduce-scatter and one all-gather of the narrow payload, accumulated in float32).
        Returns (order, (loss, dense gradients, activation gradients)).
        """
        axes, codec = self.axes, self.routing.comm.allreduce

        def body(params, rest, dense, labels, acts):
            devices = jax.lax.axis_size(axes)
            # Varying: differentiating a replicated input would make autodiff psum its
            # gradient by itself, outside the order of the step's collectives.
            params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)

            def local_loss(params, acts):
                model = nnx.merge(self.graphdef, self._no_tables, params, rest)
                return self.loss_fn(model(dense, Activations.from_features(self.config, acts)), labels)

            loss, (param_grads, act_grads) = jax.value_and_grad(local_loss, argnums=(0, 1))(params, acts)
            leaves, treedef = jax.tree.flatten(param_grads)
            flat = jnp.concatenate([leaf.reshape(-1).astype(jnp.float32) for leaf in leaves])
            summed = collectives.compressed_sum(flat, axes, codec) / devices
            sizes = [leaf.size for leaf in leaves]
            pieces = jnp.split(summed, list(itertools.accumulate(sizes))[:-1])
            param_grads = treedef.unflatten(
                [p.reshape(leaf.shape).astype(leaf.dtype) for p, leaf in zip(pieces, leaves)]
            )
            act_grads = jax.tree.map(lambda g: g / devices, act_grads)
            return collectives.sum_over(loss, axes) / devices, param_grads, act_grads

        batch_spec, replicated = P(self.axes), P()
        acts_spec = {f: batch_spec for f in acts}
        mapped = collectives.ordered_shard_map(
            body,
            mesh=self.mesh,
            in_specs=(replicated, replicated, batch_spec, batch_spec, acts_spec),
            out_specs=(replicated, replicated, acts_spec),
        )
        return mapped(order, state.params, state.rest, batch.dense, batch.labels, acts)


def to_host(tree):
    """Every process gets the full arrays as NumPy (gathered across processes when there
    are several; for small results: predictions, tests)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
