"""The split train step with tables sharded over a mesh by a `ShardingPlan`.

Same step as `recsys.training.Trainer`: lookup -> dense forward/backward -> sparse update
-> optax, in one `jax.jit` with the state donated. The lookup and the sparse update run
under `jax.shard_map` (`mesh.sharded`, `recsys.sharded_update`); the dense part is plain
data parallelism: the batch is sharded over all mesh axes, the dense parameters and their
optimizer state are replicated, and their gradients are all-reduced under `shard_map` too,
so the step minimizes the same mean loss over the whole batch as on one device. Every
collective of the step is thus one of `mesh.collectives`, and one chain orders them all
(`mesh.collectives.ordering`).
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

from mesh import collectives, relayout
from mesh.plan import ShardingPlan
from mesh.routing import RoutingOptions
from mesh.sharded import gather_logical, gather_logical_slots, logical_sharding, sharded_layout
from mesh.sharded_lookup import Routed, StepRoutes, plan_routes, route_ids, serve_routed
from recsys import kernels as kernel_paths
from recsys.batching import Batch
from recsys.embedding import EmbeddingTable, capture_init_keys, find_collection
from recsys.lookup import Activations, initial_tables, owner_bags
from recsys.sharded_update import feature_routes, init_sharded_slots, routing_inputs, sharded_sparse_update
from recsys.training.losses import LossFn, binary_cross_entropy, mean_loss, weighted_sum
from recsys.training.pipeline import Pipeline
from recsys.training.trainer import replaced


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShardedState:
    step: jax.Array
    params: nnx.State  # replicated
    rest: nnx.State  # replicated: batch statistics averaged over the devices
    opt_state: optax.OptState  # replicated
    tables: dict  # {group: sharded storage} (`mesh.sharded`)
    slots: dict  # {group: {slot: sharded storage}}
    # Steps whose bucketized routing overflowed and took the broadcast route (`mesh.bucketed`).
    routing_fallbacks: jax.Array


class ShardedTrainer:
    """Like `Trainer` (the same protocol), for a model whose tables are placed by `plan`
    on `mesh`.

    `model` is a module, or a function without arguments that builds one. Given a
    function, the model is never materialized on one device: `init_state` runs it under
    `jit` with every table's output split over the devices (each device draws only its
    block of the initial values) and moves the tables into the plan's layout piece by
    piece (`mesh.relayout`), so tables larger than any one device fit. The values equal
    those of the module the function builds.

    `kernels` chooses how the owners look up and update their rows (`recsys.kernels`):
    the Pallas embedding bag and fused update on GPU and TPU, the CPU kernels on CPU, or
    XLA.

    `id_shares` ({table: {first row of a shard: its share of the table's ids}}) sizes
    the bucketized routes where a shard's rows stand for others (`recsys.cache`).

    `pipeline` ("none", "sparse_dist" or "semi_sync", `recsys.training.pipeline`): what
    `train_steps` prepares of each next batch in the step before (`pipelined_step`; for
    the first batch, `carry_step`): its routed ids (sparse_dist, exact), or its
    activations too, looked up before the step's update (semi_sync, one update late).

    `loss_fn(outputs, batch) -> [batch]` gives per-sample losses, as for `Trainer`; each
    device evaluates it on its own samples, and the step minimizes their mean (weighted
    by `batch.weights` when given) over the whole batch. The model's other state (batch
    statistics) is averaged over the devices after every step, so it stays replicated.
    """

    def __init__(
        self,
        model: nnx.Module | Callable[[], nnx.Module],
        dense_optimizer: optax.GradientTransformation,
        plan: ShardingPlan,
        mesh: jax.sharding.Mesh,
        *,
        loss_fn: LossFn = binary_cross_entropy,
        predict_fn: Callable = jax.nn.sigmoid,
        routing: RoutingOptions | None = None,
        kernels: str = "auto",
        id_shares: dict | None = None,
        pipeline: Pipeline | str = Pipeline.SPARSE_DIST,
    ):
        self.pipeline = Pipeline(pipeline)
        self._build = None if isinstance(model, nnx.Module) else model
        if self._build is not None:
            model = nnx.eval_shape(self._build)  # shapes only: nothing is computed yet
        collection = find_collection(model)
        self.config, self.mesh, self.plan = collection.config, mesh, plan
        self.axes = tuple(mesh.axis_names)
        layout = sharded_layout(plan, self.config.tables, mesh)
        self.layout = dataclasses.replace(layout, id_shares=id_shares) if id_shares else layout
        self.graphdef, tables, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
        # The dense forward gets looked-up activations, never the tables: empty stand-ins
        # keep the module structure without holding a second copy of every table.
        self._no_tables = jax.tree.map(lambda x: jnp.zeros((0, *x.shape[1:]), x.dtype), tables)
        self._initial = None if self._build else (collection.logical_tables(), params, rest)
        self.dense_optimizer = dense_optimizer
        self.loss_fn, self.predict_fn = loss_fn, predict_fn
        self.features = feature_routes(self.config)
        self.routing = routing or RoutingOptions()
        self.kernels = kernels
        owners = [self.config.table(g.tables[0]) for g in self.layout.groups]
        kernel_paths.verify(
            ((t.dtype, g.width, t.optimizer) for t, g in zip(owners, self.layout.groups)), kernels
        )
        self.train_step = jax.jit(self._train_step, donate_argnums=0)
        self.carry_step = jax.jit(self._first_carry)
        self.pipelined_step = jax.jit(self._pipelined_step, donate_argnums=(0, 1))
        self.predict = jax.jit(self._predict)

    def init_state(self) -> ShardedState:
        replicate = lambda tree: jax.device_put(tree, self._replicated())  # noqa: E731
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

    def place_batch(self, batch: Batch) -> Batch:
        """A host batch sharded over every device: the whole batch on one process; with
        several processes, this process's share (`recsys.batching.process_share`)."""
        return self.shard_batch(batch) if jax.process_count() == 1 else self.shard_local_batch(batch)

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
        return jax.jit(build, out_shardings=(spread, self._replicated(), self._replicated()))

    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def _place_tables(self, logical) -> dict[str, jax.Array]:
        """{table: [rows, dim]} -> {group: storage}: each table is split evenly over the
        devices first, then moved into the plan's layout on the devices."""
        out = {}
        for g in self.layout.groups:
            spread = {
                t: jax.device_put(logical[t], logical_sharding(*self.layout.table_shapes[t], self.mesh))
                for t in g.tables
            }
            out[g.name] = relayout.from_logical(self.layout, g.name, spread, self.mesh)
        return out

    def logical_tables(self, state: ShardedState):
        """{table: [rows, dim]} gathered to the host (small tables, tests)."""
        return gather_logical(self.layout, to_host(state.tables))

    def logical_slots(self, state: ShardedState):
        return gather_logical_slots(self.layout, to_host(state.slots))

    def to_logical(self, state: ShardedState) -> dict:
        """The state with tables and slots per logical table, as device arrays: every table
        `[rows, dim]` split over the devices (`mesh.sharded.logical_sharding`), so orbax
        writes the shards in parallel and no process holds a whole table. Fresh buffers:
        the next step donates the state."""
        copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        tables, slots = {}, {t: {} for t in self.layout.table_shapes}
        for g in self.layout.groups:
            tables.update(relayout.to_logical(self.layout, g.name, state.tables[g.name], self.mesh))
            for kind, storage in state.slots[g.name].items():
                for table, value in relayout.to_logical(self.layout, g.name, storage, self.mesh).items():
                    slots[table][kind] = value
        return {
            "step": copy(state.step),
            "params": copy(nnx.to_pure_dict(state.params)),
            "rest": copy(nnx.to_pure_dict(state.rest)),
            "opt_state": copy(state.opt_state),
            "tables": tables,
            "slots": slots,
        }

    def from_logical(self, template: ShardedState, tree: dict) -> ShardedState:
        """Inverse of `to_logical`, laid out by this trainer's plan."""
        tables, slots = {}, {}
        for g in self.layout.groups:
            tables[g.name] = relayout.from_logical(self.layout, g.name, tree["tables"], self.mesh)
            slots[g.name] = {
                kind: relayout.from_logical(
                    self.layout, g.name, {t: tree["slots"][t][kind] for t in g.tables}, self.mesh
                )
                for kind in template.slots[g.name]
            }
        return ShardedState(
            step=tree["step"],
            params=replaced(template.params, tree["params"]),
            rest=replaced(template.rest, tree["rest"]),
            opt_state=tree["opt_state"],
            tables=tables,
            slots=slots,
            routing_fallbacks=template.routing_fallbacks,
        )

    def routes(self, batch_size: int) -> StepRoutes:
        """How a step of `batch_size` samples routes every sharded group (forward and backward)."""
        local_batch = batch_size // self.mesh.devices.size
        return plan_routes(self.layout, self.features, local_batch, self.routing)

    def _predict(self, state: ShardedState, dense: jax.Array, sparse):
        """`predict_fn` of the model's outputs in evaluation mode (`nnx.Module.eval`), the
        batch sharded like a training batch."""
        model = nnx.merge(self.graphdef, self._no_tables, state.params, state.rest)
        model.eval()
        acts, _ = self._serve(state.tables, *self._routed(sparse), sparse)
        return self.predict_fn(model(dense, Activations.from_features(self.config, acts)))

    def _train_step(self, state: ShardedState, batch: Batch) -> tuple[ShardedState, jax.Array]:
        routed, order = self._routed(batch.sparse)
        acts, order = self._serve(state.tables, routed, order, batch.sparse)
        state, loss, _ = self._learn(state, routed, acts, order, batch)
        return state, loss

    def _routed(self, sparse, order=None) -> tuple[Routed, jax.Array]:
        """(what the owners of a batch's ids receive, the collectives' order after it):
        `mesh.sharded_lookup.route_ids`."""
        routes = self.routes(sparse.batch_size)
        return route_ids(self.layout, routes, *routing_inputs(self.config, sparse), self.mesh, order)

    def _serve(self, tables, routed: Routed, order, sparse):
        """(the batch's activations from `tables`, the order after): the owners look up
        what they received and send the results back (`mesh.sharded_lookup.serve_routed`)."""
        ids, coef = routing_inputs(self.config, sparse)
        bags = owner_bags(self.config, self.layout, self.kernels)
        routes = self.routes(sparse.batch_size)
        return serve_routed(self.layout, tables, routes, routed, ids, coef, self.mesh, bags, order)

    def _first_carry(self, state: ShardedState, batch: Batch):
        """What the pipeline hands the first step: `batch`'s routed ids (sparse_dist), and
        its activations with them (semi_sync)."""
        routed, order = self._routed(batch.sparse)
        if self.pipeline is not Pipeline.SEMI_SYNC:
            return routed
        return self._serve(state.tables, routed, order, batch.sparse)[0], routed

    def _pipelined_step(self, state: ShardedState, carry, batch: Batch, next_batch: Batch):
        """The step on `batch` with what the step before carried over, preparing
        `next_batch`: (state, its carry, loss).

        sparse_dist: the carry is `batch`'s routed ids; `next_batch`'s are routed after
        this step's last collective, beside its update. Exact.
        semi_sync: the carry is also `batch`'s activations, looked up in the step before;
        `next_batch`'s are looked up first, from the tables before this step's update, so
        the lookup runs beside this step's dense work. A batch sees its rows one update
        late."""
        if self.pipeline is Pipeline.SEMI_SYNC:
            acts, routed = carry
            next_routed, order = self._routed(next_batch.sparse)
            next_acts, order = self._serve(state.tables, next_routed, order, next_batch.sparse)
            state, loss, _ = self._learn(state, routed, acts, order, batch)
            return state, (next_acts, next_routed), loss
        acts, order = self._serve(state.tables, carry, None, batch.sparse)
        state, loss, order = self._learn(state, carry, acts, order, batch)
        return state, self._routed(next_batch.sparse, order)[0], loss

    def _learn(self, state: ShardedState, routed: Routed, acts, order, batch: Batch):
        """The dense forward and backward on `acts`, the sparse update of the rows
        `routed` reached, the dense update: (state, loss, the collectives' order)."""
        routes = self.routes(batch.sparse.batch_size)
        order, (loss, param_grads, act_grads, rest) = self._dense_grads(state, batch, acts, order)
        tables, slots, order = sharded_sparse_update(
            self.config,
            self.layout,
            self.mesh,
            state.tables,
            state.slots,
            routes,
            routed,
            batch.sparse,
            act_grads,
            state.step,
            self.kernels,
            order=order,
        )
        fell_back = jnp.zeros((), bool)  # any bucketized group took its overflow route
        for received in routed.values():
            if received.fallback is not None:
                fell_back = fell_back | received.fallback
        updates, opt_state = self.dense_optimizer.update(param_grads, state.opt_state, state.params)
        new_state = ShardedState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            rest=rest,
            opt_state=opt_state,
            tables=tables,
            slots=slots,
            routing_fallbacks=state.routing_fallbacks + fell_back.astype(jnp.int32),
        )
        return new_state, loss, order

    def _dense_grads(self, state: ShardedState, batch: Batch, acts, order):
        """The dense backward per device, its gradients summed by `compressed_sum` (a plain
        float32 all-reduce unless `--comm allreduce` compresses it).

        Each device differentiates its part of the global mean loss: the mean of its own
        samples' losses divided by the device count (equal shares), or, with per-sample
        weights, the weighted sum of its losses over the whole batch's total weight. The
        dense gradients are then the sum of the devices' and the activation gradients are
        each device's own. All dense gradients travel as one flat vector: one all-reduce
        per step (compressed: one reduce-scatter and one all-gather of the narrow payload,
        accumulated in float32).
        Returns (order, (loss, dense gradients, activation gradients, the model's rest)).
        """
        axes, codec = self.axes, self.routing.comm.allreduce

        def body(params, rest, batch, acts):
            # Varying: differentiating a replicated input would make autodiff psum its
            # gradient by itself, outside the order of the step's collectives.
            params = jax.tree.map(lambda p: jax.lax.pcast(p, axes, to="varying"), params)
            objective, divisor = self._local_objective(batch, axes)

            def local_loss(params, acts):
                # Fresh variables of this trace: the model updates its other state in place.
                model = nnx.merge(self.graphdef, self._no_tables, params, _keys_per_device(rest, axes))
                outputs = model(batch.dense, Activations.from_features(self.config, acts))
                return objective(self.loss_fn(outputs, batch)), nnx.split(
                    model, EmbeddingTable, nnx.Param, ...
                )[3]

            (loss, new_rest), (param_grads, act_grads) = jax.value_and_grad(
                local_loss, argnums=(0, 1), has_aux=True
            )(params, acts)
            param_grads = _unflatten_like(
                param_grads, collectives.compressed_sum(_flat(param_grads), axes, codec) / divisor
            )
            act_grads = jax.tree.map(lambda g: g / divisor, act_grads)
            loss = collectives.sum_over(loss, axes) / divisor
            return loss, param_grads, act_grads, _device_mean(_keys_of(rest, new_rest), axes)

        batch_spec, replicated = P(self.axes), P()
        acts_spec = {f: batch_spec for f in acts}
        mapped = collectives.ordered_shard_map(
            body,
            mesh=self.mesh,
            in_specs=(replicated, replicated, batch_spec, acts_spec),
            out_specs=(replicated, replicated, acts_spec, replicated),
        )
        return mapped(order, state.params, state.rest, batch, acts)

    def _local_objective(self, batch: Batch, axes):
        """(per-sample losses -> this device's share of the mean loss, the divisor of its
        gradients). Without weights, the local mean and the device count (equal shares);
        with weights, the weighted sum over the whole batch's total weight, and 1."""
        if batch.weights is None:
            return (lambda losses: mean_loss(losses, None)), jax.lax.axis_size(axes)
        total = collectives.sum_over(jnp.sum(batch.weights), axes)
        return (lambda losses: weighted_sum(losses, batch.weights) / total), 1


def _flat(tree) -> jax.Array:
    return jnp.concatenate([leaf.reshape(-1).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def _unflatten_like(tree, flat: jax.Array):
    """`flat` (as made by `_flat`) cut into `tree`'s leaves, with their shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    pieces = jnp.split(flat, list(itertools.accumulate(leaf.size for leaf in leaves))[:-1])
    return treedef.unflatten([p.reshape(x.shape).astype(x.dtype) for p, x in zip(pieces, leaves)])


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_per_device(rest: nnx.State, axes) -> nnx.State:
    """A fresh copy of the model's other state whose RNG keys are folded with the device
    index: otherwise every device would draw the same dropout mask for its i-th sample."""
    device = jax.lax.axis_index(axes)
    return jax.tree.map(lambda x: jax.random.fold_in(x, device) if _is_key(x) else x, rest)


def _keys_of(before: nnx.State, after: nnx.State) -> nnx.State:
    """`after` with the replicated RNG keys of `before` (the folded ones are per device)."""
    return jax.tree.map(lambda old, new: old if _is_key(old) else new, before, after)


def _device_mean(rest: nnx.State, axes) -> nnx.State:
    """The model's other state, replicated again: float leaves that differ per device
    (batch statistics) averaged over the devices; the others (RNG counts) advance alike
    everywhere."""
    floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda x: collectives.mean_over(x, axes) if floating(x) else x, rest)


def to_host(tree):
    """Every process gets the full arrays as NumPy (gathered across processes when there
    are several; for small results: predictions, tests)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
