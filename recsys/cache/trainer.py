"""Training with tables larger than the device: a cache of hot rows on the device over
the full tables in host memory.

A cached table lives in two tiers: the host holds every row and its optimizer state
(`HostTable`); the device holds `capacity` slots of rows and state inside the ordinary
stacked table of the step. Before a batch's step, its misses are copied into slots
(evicting rows that go back to the host), and its ids are rewritten to slots, so the
unchanged train step (`Trainer`: the lookup and fused-update kernels) runs on the slots.
Which rows occupy the slots changes nothing in the arithmetic: cached training equals
uncached training bitwise.

Pipelining: `train_step(state, batch, upcoming)` dispatches batch i's step and, while
it runs, admits batch i+1 (its misses and victims chosen with the next batches in
view) and starts the copy of its misses to the device. Evicted rows come back to the
host asynchronously; a fetch of an id waits for that id's write-back.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recsys.batching import Batch
from recsys.cache.config import CacheConfig
from recsys.cache.host import HostTable, WritebackQueue
from recsys.cache.slots import Admission, SlotMap
from recsys.embedding import EmbeddingTable, capture_init_keys, find_collection
from recsys.layout import build_layout
from recsys.lookup import init_table
from recsys.sparse import JaggedBatch, JaggedFeature
from recsys.sparse_optim import row_optimizer
from recsys.specs import EmbeddingConfig, TableSpec
from recsys.training.trainer import Trainer, TrainState


@dataclasses.dataclass
class TableCounts:
    """One cached table's traffic over the training steps."""

    lookups: int = 0  # unique ids per batch, summed
    hits: int = 0
    fetched: int = 0  # rows copied host -> device
    evicted: int = 0  # rows written back device -> host

    def add(self, admission: Admission) -> None:
        self.lookups += len(admission.slots)
        self.hits += admission.hits
        self.fetched += len(admission.fill_ids)
        self.evicted += int(np.sum(admission.evicted_ids >= 0))


@dataclasses.dataclass
class _Admitted:
    """A batch admitted to every cached table: its slots, and its fills on their way."""

    admissions: dict[str, Admission]
    fills: dict | None  # device arrays for `_evict` and `_fill_slots`; None once applied


@dataclasses.dataclass
class CachedState:
    """The device train state with the host tier. `train_step` and `predict` update the
    host parts in place; the state they return is this object."""

    device: TrainState
    host: dict[str, HostTable]
    maps: dict[str, SlotMap]
    writebacks: WritebackQueue
    counts: dict[str, TableCounts]
    steps: int = 0
    ahead: _Admitted | None = None

    @property
    def step(self) -> jax.Array:
        return self.device.step


class CachedTrainer:
    """A `Trainer` whose tables named in `cache.load_factors` live in host memory with a
    device cache. Same protocol (`init_state`, `place_batch`, `train_step`, `predict`,
    `to_logical` / `from_logical`); `train_step` also takes the upcoming batches' ids
    (`lookahead`) to prefetch and to choose victims.

    `model` is a module, or a function without arguments that builds one (then no full
    table is ever made on the device: the build runs under `jit` and the cached tables
    are drawn on the host). Other arguments are `Trainer`'s.
    """

    def __init__(
        self,
        model: nnx.Module | Callable[[], nnx.Module],
        dense_optimizer: optax.GradientTransformation,
        cache: CacheConfig,
        **trainer_options,
    ):
        self.cache = cache
        abstract = model if isinstance(model, nnx.Module) else nnx.eval_shape(model)
        self.config: EmbeddingConfig = find_collection(abstract).config
        self.device_config = cache.device_config(self.config)  # a slot per cached row
        self.layout = build_layout(self.device_config)
        self._full_layout = build_layout(self.config)
        self.cached = {t.name: t for t in self.config.tables if t.name in cache.load_factors}
        device_model, self._initial_host = self._split_tiers(model, abstract)
        logical_rows = {t: spec.rows for t, spec in self.cached.items()}
        self.trainer = Trainer(device_model, dense_optimizer, logical_rows=logical_rows, **trainer_options)
        self._evict = jax.jit(self._evict_fn)
        self._fill_slots = jax.jit(self._fill_fn, donate_argnums=(0, 1, 2))

    def _split_tiers(self, model, abstract) -> tuple[nnx.Module, Callable[[], dict[str, np.ndarray]]]:
        """The model as the device holds it (cached tables as empty slots) and a function
        drawing the cached tables' initial rows on the host."""
        if isinstance(model, nnx.Module):
            logical = find_collection(model).logical_tables()
            _, _, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
            host_initial = lambda: {t: np.array(logical[t]) for t in self.cached}  # noqa: E731
            values = {t: v for t, v in logical.items() if t not in self.cached}
        else:
            key, params, rest = jax.jit(_build_keeping_key(model))()
            cpu = jax.devices("cpu")[0]
            host_initial = lambda: self._draw(self.cached, key, cpu)  # noqa: E731
            values = self._draw({t.name: t for t in self.config.tables if t.name not in self.cached}, key)
        abstract = nnx.eval_shape(lambda: nnx.clone(model)) if isinstance(model, nnx.Module) else abstract
        collection = find_collection(abstract)
        collection.config = self.device_config
        graphdef, tables, _, _ = nnx.split(abstract, EmbeddingTable, nnx.Param, ...)
        device_model = nnx.merge(graphdef, tables, params, rest)
        find_collection(device_model).set_stacked_tables(self._stack(values))
        return device_model, host_initial

    def _draw(self, specs: dict[str, TableSpec], key, device=None) -> dict[str, np.ndarray | jax.Array]:
        """Initial values of `specs`' tables as the uncached model draws them
        (`recsys.lookup.initial_tables`), on `device` (the host: NumPy)."""
        index = {t.name: i for i, t in enumerate(self.config.tables)}
        if device is None:
            return {n: init_table(s, jax.random.fold_in(key, index[n])) for n, s in specs.items()}
        with jax.default_device(device):
            key = jax.device_put(key, device)
            return {n: np.array(init_table(s, jax.random.fold_in(key, index[n]))) for n, s in specs.items()}

    def _stack(self, uncached: dict) -> dict[str, jax.Array]:
        """{group: stacked device table}: uncached tables' values, cached tables' slots empty."""
        out = {}
        for group in self.layout.table_groups:
            parts = [
                jnp.zeros((t.rows, t.dim), t.dtype)
                if t.name in self.cached
                else jnp.asarray(uncached[t.name])
                for t in group.tables
            ]
            out[group.name] = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        return out

    # The protocol.

    def init_state(self) -> CachedState:
        host = {}
        for name, rows in self._initial_host().items():
            spec = self.cached[name]
            host[name] = HostTable(rows, _initial_row_state(spec))
        return CachedState(
            device=dataclasses.replace(self.trainer.init_state(), row_keys=self._initial_row_keys()),
            host=host,
            maps={
                n: SlotMap(n, t.rows, self.cache.capacity(t), self.cache.policy)
                for n, t in self.cached.items()
            },
            writebacks=WritebackQueue(host),
            counts={n: TableCounts() for n in self.cached},
        )

    def _initial_row_keys(self) -> dict[str, jax.Array]:
        """{group holding a cached table: the row each stored row rounds as}: uncached
        rows as in the uncached layout; slots as their ids once filled (`_fill_fn`)."""
        keys = {}
        for group in self.layout.table_groups:
            if not any(t.name in self.cached for t in group.tables):
                continue
            start = self._full_layout.group(group.name).offset_of
            parts = [
                np.zeros(t.rows, np.int32)
                if t.name in self.cached
                else np.arange(t.rows, dtype=np.int32) + start(t.name)
                for t in group.tables
            ]
            keys[group.name] = jnp.asarray(np.concatenate(parts))
        return keys

    def place_batch(self, batch: Batch) -> Batch:
        """The batch stays on the host: its ids become slots only when its step comes."""
        return batch

    def unique_ids(self, batch: Batch) -> dict[str, np.ndarray]:
        """{cached table: the batch's distinct ids} (what an upcoming batch announces)."""
        parts = collections.defaultdict(list)
        for feature in self.config.features:
            if feature.table in self.cached:
                bags = batch.sparse[feature.name]
                parts[feature.table].append(np.asarray(bags.ids)[_valid(bags)])
        return {
            t: np.unique(np.concatenate(parts[t])) if parts[t] else np.zeros(0, np.int64) for t in self.cached
        }

    def lookahead(self, batches: Iterable) -> Iterator[tuple[object, list[dict[str, np.ndarray]]]]:
        """(item, the next `prefetch_depth` items' `unique_ids`) for every item of
        `batches`; an item is a `Batch` or a tuple whose first element is one."""
        depth = max(self.cache.prefetch_depth, 1)
        window: collections.deque = collections.deque()
        source = iter(batches)
        for item in source:
            window.append((item, self.unique_ids(_batch_of(item))))
            if len(window) > depth:
                yield window[0][0], [ids for _, ids in list(window)[1:]]
                window.popleft()
        while window:
            yield window[0][0], [ids for _, ids in list(window)[1:]]
            window.popleft()

    def train_step(
        self, state: CachedState, batch: Batch, upcoming=(), *, overlap: bool = True
    ) -> tuple[CachedState, jax.Array]:
        """One step on `batch` (host arrays); `upcoming`: the next batches' `unique_ids`,
        nearest first. With them, the next batch is admitted and its misses travel while
        this step runs (`overlap=False` waits for the step first: what the overlap hides)."""
        if state.ahead is not None:  # admitted while the step before ran
            admitted, state.ahead = state.ahead, None
        else:
            admitted = self._admit(state, self.unique_ids(batch), upcoming, count=True)
        # Rewritten and placed before the exchange, which waits for the step in flight.
        placed = self._remapped(state, batch, admitted)
        self._apply(state, admitted)
        state.device, loss = self.trainer.train_step(state.device, placed)
        state.steps += 1
        if upcoming:
            if not overlap:
                loss.block_until_ready()
            state.ahead = self._admit(state, upcoming[0], upcoming[1:], count=True)
        return state, loss

    def predict(self, state: CachedState, dense, sparse: JaggedBatch):
        """Predictions through the cache (the rows are admitted like a step's, not counted)."""
        if state.ahead is not None:
            self._apply(state, state.ahead)  # its victims must leave before others are chosen
        batch = Batch(dense, sparse, labels=np.zeros(len(dense), np.float32))
        admitted = self._admit(state, self.unique_ids(batch), (), count=False)
        self._apply(state, admitted)
        placed = self._remapped(state, batch, admitted)
        return self.trainer.predict(state.device, placed.dense, placed.sparse)

    def precompile(self, state: CachedState, max_misses: int) -> None:
        """Compiles the exchange for every fill size up to `max_misses` rows per table (by
        running exchanges that move nothing), so no later step pauses to compile one."""
        size = 16
        while True:
            admissions = {t: _nothing_admitted() for t in self.cached}
            fills = {g: self._fill(state.host, g, m, size) for g, m in self._by_group(admissions).items()}
            self._apply(state, _Admitted(admissions, jax.device_put(fills)))
            if size >= max_misses:
                return
            size *= 2

    # The tiers.

    def _admit(self, state: CachedState, ids: dict, upcoming, *, count: bool) -> _Admitted:
        """Admits a batch to every cached table and starts copying its misses over."""
        # The batch in flight may lose its slots: the exchange runs after its step on the
        # device (it takes the step's output state). An admitted batch not yet run may not.
        pinned = {} if state.ahead is None else {t: a.slots for t, a in state.ahead.admissions.items()}
        admissions = {}
        for table, slot_map in state.maps.items():
            admission = slot_map.admit(
                ids[table], pinned=pinned.get(table), upcoming=[u[table] for u in upcoming]
            )
            admissions[table] = admission
            if count:
                state.counts[table].add(admission)
        for table, admission in admissions.items():
            state.writebacks.settle(table, admission.fill_ids)  # a fetched row must be written back first
        by_group = self._by_group(admissions)
        # One padded size for every group: the exchange compiles once per size.
        size = _bucket(max(sum(len(a.fill_ids) for _, a in members) for members in by_group.values()))
        fills = {g: self._fill(state.host, g, members, size) for g, members in by_group.items()}
        return _Admitted(admissions, jax.device_put(fills))

    def _by_group(self, admissions: dict[str, Admission]) -> dict[str, list[tuple[str, Admission]]]:
        out: dict[str, list] = {}
        for table, admission in admissions.items():
            out.setdefault(self.layout.group_of_table[table].name, []).append((table, admission))
        return out

    def _fill(self, host: dict[str, HostTable], group: str, members, size: int):
        """(fill rows, evict rows, rows, state, rounding keys) of a group's cached tables for `_apply`,
        in member order, padded to `size` (padding indexes past the group: dropped)."""
        layout, full = self.layout.group(group), self._full_layout.group(group)
        fill_at, evict_at, rows, state, keys = [], [], [], {}, []
        for table, admission in members:
            offset = layout.offset_of(table)
            keys.append(admission.fill_ids + full.offset_of(table))
            fill_at.append(admission.fill_slots + offset)
            evict_at.append(admission.fill_slots[admission.evicted_ids >= 0] + offset)
            rows.append(host[table].rows[admission.fill_ids])
            for k, v in host[table].state.items():
                state.setdefault(k, []).append(v[admission.fill_ids])
        end = layout.total_rows
        return (
            _padded(np.concatenate(fill_at), size, end),
            _padded(np.concatenate(evict_at), size, end),
            _padded(np.concatenate(rows), size, 0),
            {k: _padded(np.concatenate(v), size, 0) for k, v in state.items()},
            _padded(np.concatenate(keys), size, 0),
        )

    def _apply(self, state: CachedState, admitted: _Admitted) -> None:
        """Runs an admission's exchange on the device once and queues its write-backs."""
        if admitted.fills is None:
            return
        device = state.device
        evicted = self._evict(device.tables, device.slots, admitted.fills)
        tables, slots, keys = self._fill_slots(device.tables, device.slots, device.row_keys, admitted.fills)
        state.device = dataclasses.replace(device, tables=tables, slots=slots, row_keys=keys)
        for group, members in self._by_group(admitted.admissions).items():
            gone = [(t, a.evicted_ids[a.evicted_ids >= 0]) for t, a in members]
            state.writebacks.push(gone, *evicted[group])
        admitted.fills = None

    def _evict_fn(self, tables_state: nnx.State, slots: dict, fills: dict) -> dict:
        """{group: (rows, state)} the fills' victims hold."""
        tables = _groups_in(nnx.to_pure_dict(tables_state), {g.name for g in self.layout.table_groups})
        return {
            g: (_rows_at(tables[g], evict_at), {k: _rows_at(slots[g][k], evict_at) for k in state})
            for g, (_, evict_at, _, state, _) in fills.items()
        }

    def _fill_fn(self, tables_state: nnx.State, slots: dict, row_keys: dict, fills: dict):
        """Writes the misses into their slots, in place (the tables and slots are donated;
        a read of them in the same program would make XLA copy the whole stacked table,
        so `_evict_fn` reads the victims before)."""
        pure = nnx.to_pure_dict(tables_state)
        tables = _groups_in(pure, {g.name for g in self.layout.table_groups})
        slots, row_keys = {g: dict(s) for g, s in slots.items()}, dict(row_keys)
        for group, (fill_at, _, rows, state, keys) in fills.items():
            tables[group] = tables[group].at[fill_at].set(rows, mode="drop")
            row_keys[group] = row_keys[group].at[fill_at].set(keys, mode="drop")
            for k, v in state.items():
                slots[group][k] = slots[group][k].at[fill_at].set(v, mode="drop")
        out = jax.tree.map(lambda x: x, tables_state)
        nnx.replace_by_pure_dict(out, pure)
        return out, slots, row_keys

    def _remapped(self, state: CachedState, batch: Batch, admitted: _Admitted) -> Batch:
        """The batch on the device with each cached feature's ids replaced by slots."""
        features = {}
        for name, bags in batch.sparse.features.items():
            table = self.config.feature(name).table
            if table in self.cached:
                slots = state.maps[table].slot_of[np.asarray(bags.ids)]
                if slots.min() < 0 and (slots[_valid(bags)] < 0).any():
                    raise ValueError(
                        f"table {table!r}: this batch's ids differ from those announced as the next "
                        "batch in the `upcoming` of the step before"
                    )
                # Padding positions (id 0, weight 0) may name an uncached id: any slot will do.
                bags = JaggedFeature(np.maximum(slots, 0), bags.lengths, bags.weights)
            features[name] = bags
        # device_put, not jnp.asarray: a transfer is queued without waiting for the step in flight.
        return jax.device_put(dataclasses.replace(batch, sparse=JaggedBatch(features)))

    # Checkpoints and inspection.

    def flush(self, state: CachedState) -> None:
        """Writes every cached row and its state back to the host tier (rows stay cached)."""
        if state.ahead is not None:
            self._apply(state, state.ahead)
        state.writebacks.drain()
        tables = self.trainer.stacked_tables(state.device)
        for table, slot_map in state.maps.items():
            group = self.layout.group_of_table[table]
            slots, ids = slot_map.cached_ids()
            at = slots + group.offset_of(table)
            rows = np.asarray(tables[group.name][at])
            row_state = {k: np.asarray(v[at]) for k, v in state.device.slots[group.name].items()}
            state.host[table].scatter(ids, rows, row_state)

    def logical_tables(self, state: CachedState) -> dict[str, np.ndarray]:
        self.flush(state)
        out = self.trainer.logical_tables(state.device)
        out.update({t: np.array(h.rows) for t, h in state.host.items()})
        return out

    def to_logical(self, state: CachedState) -> dict:
        """The uncached trainer's tree: cached tables and their state from the flushed
        host tier (copies: training goes on while a save writes them)."""
        self.flush(state)
        tree = self.trainer.to_logical(state.device)
        for table, host in state.host.items():
            tree["tables"][table] = np.array(host.rows)
            tree["slots"][table] = {k: np.array(v) for k, v in host.state.items()}
        return tree

    def from_logical(self, template: CachedState, tree: dict) -> CachedState:
        """Restores an uncached or a cached run's tree; the caches start empty."""
        device_tree = {**tree, "tables": dict(tree["tables"]), "slots": dict(tree["slots"])}
        empty = self.trainer.to_logical(template.device)
        for table in self.cached:
            device_tree["tables"][table] = empty["tables"][table]
            device_tree["slots"][table] = empty["slots"][table]
        state = self.init_state_like(template)
        device = self.trainer.from_logical(template.device, device_tree)
        state.device = dataclasses.replace(device, row_keys=self._initial_row_keys())
        for table, host in state.host.items():
            host.rows[...] = np.asarray(tree["tables"][table], host.rows.dtype)
            for k, v in host.state.items():
                v[...] = np.asarray(tree["slots"][table][k], v.dtype)
        return state

    def init_state_like(self, template: CachedState) -> CachedState:
        """A fresh host tier around `template`'s arrays (empty caches, nothing queued)."""
        template.writebacks.clear()
        for slot_map in template.maps.values():
            slot_map.clear()
        return CachedState(
            device=template.device,
            host=template.host,
            maps=template.maps,
            writebacks=template.writebacks,
            counts={n: TableCounts() for n in self.cached},
        )

    def cache_metrics(self, state: CachedState) -> dict:
        """Hit rates and bytes per step over the training steps so far."""
        steps = max(state.steps, 1)
        per_table = {t: c.hits / c.lookups if c.lookups else None for t, c in state.counts.items()}
        lookups = sum(c.lookups for c in state.counts.values())
        row_bytes = {t: h.row_bytes() for t, h in state.host.items()}
        return {
            "cache_hit_rate": sum(c.hits for c in state.counts.values()) / lookups if lookups else None,
            "cache_hit_rates": per_table,
            "cache_host_to_device_bytes_per_step": sum(
                c.fetched * row_bytes[t] for t, c in state.counts.items()
            )
            / steps,
            "cache_device_to_host_bytes_per_step": sum(
                c.evicted * row_bytes[t] for t, c in state.counts.items()
            )
            / steps,
        }


def _build_keeping_key(build: Callable[[], nnx.Module]):
    """A function returning (the tables' init key, dense parameters, the rest) of the
    built model; under `jit` the tables it draws are dead code."""

    def run():
        with capture_init_keys() as keys:
            model = build()
        _, _, params, rest = nnx.split(model, EmbeddingTable, nnx.Param, ...)
        return keys[0], params, rest

    return run


def _initial_row_state(spec: TableSpec) -> dict[str, np.ndarray]:
    """The optimizer's initial state for every row (one row drawn, then repeated)."""
    one = jax.device_get(row_optimizer(spec.optimizer).init(1, spec.dim))
    return {k: np.repeat(np.asarray(v), spec.rows, axis=0) for k, v in one.items()}


def _groups_in(pure: dict, names: set[str]) -> dict:
    """The dict {group: stacked table} inside a pure dict of the model's tables."""
    if set(pure) == names:
        return pure
    for value in pure.values():
        if isinstance(value, dict) and (found := _groups_in(value, names)) is not None:
            return found
    return None


def _rows_at(values: jax.Array, at: jax.Array) -> jax.Array:
    """Rows `at` (zeros where `at` is past the end: padding)."""
    return values.at[at].get(mode="fill", fill_value=0)


def _valid(bags: JaggedFeature) -> np.ndarray:
    lengths = np.asarray(bags.lengths)
    return np.arange(bags.ids.shape[1])[None, :] < lengths[:, None]


def _batch_of(item) -> Batch:
    return item[0] if isinstance(item, tuple) else item


def _nothing_admitted() -> Admission:
    empty = np.zeros(0, np.int64)
    return Admission(empty.astype(np.int32), empty.astype(np.int32), empty, empty)


def _bucket(n: int) -> int:
    """Fill sizes are padded to powers of two (at least 16), so few exchanges compile."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def _padded(values: np.ndarray, size: int, fill) -> np.ndarray:
    """`values` with `size` rows, the rows past its own holding `fill`."""
    dtype = np.int32 if values.dtype.kind in "iu" else values.dtype
    out = np.full((size, *values.shape[1:]), fill, dtype)
    out[: len(values)] = values
    return out
