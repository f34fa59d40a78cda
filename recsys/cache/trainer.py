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
from recsys.cache.blocks import CacheBlock, cached_config, whole_table_blocks
from recsys.cache.config import CacheConfig
from recsys.cache.exchange import Exchange, GroupStorage, Target
from recsys.cache.host import HostTable, WritebackQueue, write
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
    """A batch admitted to every cache block: its slots, and its fills on their way."""

    admissions: dict[CacheBlock, Admission]
    fills: tuple | None  # (device arrays, read pieces) of the exchange; None once applied


@dataclasses.dataclass
class CachedState:
    """The device train state with the host tier. `train_step` and `predict` update the
    host parts in place; the state they return is this object."""

    device: TrainState
    host: dict[str, HostTable]
    maps: dict[CacheBlock, SlotMap]
    writebacks: WritebackQueue
    counts: dict[str, TableCounts]
    steps: int = 0
    ahead: _Admitted | None = None

    @property
    def step(self) -> jax.Array:
        return self.device.step

    @property
    def routing_fallbacks(self) -> jax.Array:
        """A sharded run's steps that took the broadcast route (`ShardedState`)."""
        return self.device.routing_fallbacks


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
        self._setup(model, cache)
        self.blocks = {
            t.name: whole_table_blocks(t, cache.load_factors[t.name]) for t in self.cached.values()
        }
        slot_rows = {t: blocks[0].capacity for t, blocks in self.blocks.items()}
        self.device_config = cached_config(self.config, self.blocks, slot_rows)
        self.layout = build_layout(self.device_config)
        logical_rows = {t: spec.rows for t, spec in self.cached.items()}
        self.trainer = Trainer(
            self._device_model(), dense_optimizer, logical_rows=logical_rows, **trainer_options
        )
        self.exchange = Exchange(self._flat_groups(), self._flat_targets(), None)
        self._compile_exchange()

    def _setup(self, model, cache: CacheConfig) -> None:
        self.cache, self._model = cache, model
        self._abstract = model if isinstance(model, nnx.Module) else nnx.eval_shape(model)
        self.config: EmbeddingConfig = find_collection(self._abstract).config
        unknown = sorted(set(cache.load_factors) - {t.name for t in self.config.tables})
        if unknown:
            raise ValueError(f"cache load factors name tables the model does not have: {unknown}")
        self._full_layout = build_layout(self.config)
        self.cached = {t.name: t for t in self.config.tables if t.name in cache.load_factors}

    def _compile_exchange(self) -> None:
        self._read = jax.jit(lambda device, arrays: self.exchange.read(*self._parts(device)[:2], arrays))
        self._write = jax.jit(self._write_fn, donate_argnums=0)

    def _device_model(self) -> nnx.Module:
        device_model, self._initial_host = self._split_tiers(self._model, self._abstract)
        return device_model

    def _flat_groups(self) -> dict[str, GroupStorage]:
        """The stacked groups holding cached tables, as the exchange writes them."""
        out = {}
        for group in self.layout.table_groups:
            cached = tuple(t.name for t in group.tables if t.name in self.cached)
            if cached:
                narrow = group.tables[0].rounds_stochastically
                out[group.name] = GroupStorage(
                    group.name, False, group.total_rows, group.tables[0].dim, narrow, cached
                )
        return out

    def _flat_targets(self) -> dict[CacheBlock, list[Target]]:
        out = {}
        for table, blocks in self.blocks.items():
            group, full = self.layout.group_of_table[table], self._full_layout.group_of_table[table]
            dim = self.cached[table].dim
            out[blocks[0]] = [Target(group.name, -1, group.offset_of(table), (0, dim), full.offset_of(table))]
        return out

    def cached_rows(self, table: str) -> int:
        """Device slots of a cached table, over all its blocks."""
        return sum(b.capacity for b in self.blocks[table])

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
        find_collection(device_model).set_stacked_tables(
            self._stack(values, build_layout(self.device_config))
        )
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

    def _stack(self, uncached: dict, layout) -> dict[str, jax.Array]:
        """{group: stacked device table}: uncached tables' values, cached tables' slots empty."""
        out = {}
        for group in layout.table_groups:
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
            device=self._keyed(self.trainer.init_state()),
            host=host,
            maps=self._slot_maps(),
            writebacks=WritebackQueue(host),
            counts={n: TableCounts() for n in self.cached},
        )

    def _slot_maps(self) -> dict[CacheBlock, SlotMap]:
        return {
            b: SlotMap(b.name, b.row_count, b.capacity, self.cache.policy)
            for blocks in self.blocks.values()
            for b in blocks
        }

    # What differs on a mesh (`ShardedCachedTrainer`).

    def _keyed(self, device: TrainState) -> TrainState:
        """The device state with the initial rounding keys."""
        return dataclasses.replace(device, row_keys=self._initial_row_keys())

    def _bare(self, device: TrainState) -> TrainState:
        """The device state as the inner trainer's checkpoints know it."""
        return device

    def _parts(self, device: TrainState) -> tuple[dict, dict, dict]:
        """(stacked tables, slots, rounding keys), each {group: array}."""
        names = {g.name for g in self.layout.table_groups}
        return _groups_in(nnx.to_pure_dict(device.tables), names), device.slots, device.row_keys

    def _with_parts(self, device: TrainState, storage: dict, slots: dict, keys: dict) -> TrainState:
        pure = nnx.to_pure_dict(device.tables)
        _groups_in(pure, set(storage)).update(storage)
        tables = jax.tree.map(lambda x: x, device.tables)
        nnx.replace_by_pure_dict(tables, pure)
        return dataclasses.replace(device, tables=tables, slots=slots, row_keys=keys)

    def _place(self, batch: Batch) -> Batch:
        # device_put, not jnp.asarray: a transfer is queued without waiting for the step in flight.
        return jax.device_put(batch)

    def _initial_row_keys(self) -> dict[str, jax.Array]:
        """{narrow group holding a cached table: the row each stored row rounds as}:
        uncached rows as in the uncached layout; slots as their ids once filled
        (`Exchange.write`)."""
        keys = {}
        for name in (g.name for g in self.exchange.groups.values() if g.keyed):
            group = self.layout.group(name)
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

    def unique_ids(self, batch: Batch) -> dict[CacheBlock, np.ndarray]:
        """{cache block: the batch's distinct ids in it, from the block's first row}: what
        an upcoming batch announces."""
        parts = collections.defaultdict(list)
        for feature in self.config.features:
            if feature.table in self.cached:
                bags = batch.sparse[feature.name]
                parts[feature.table].append(np.asarray(bags.ids)[_valid(bags)])
        out = {}
        for table, blocks in self.blocks.items():
            ids = np.unique(np.concatenate(parts[table])) if parts[table] else np.zeros(0, np.int64)
            for b in blocks:
                out[b] = ids[np.searchsorted(ids, b.rows[0]) : np.searchsorted(ids, b.rows[1])] - b.rows[0]
        return out

    def lookahead(self, batches: Iterable) -> Iterator[tuple[object, list[dict[CacheBlock, np.ndarray]]]]:
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
        placed = self._remapped(state, batch)
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
        placed = self._remapped(state, batch)
        return self.trainer.predict(state.device, placed.dense, placed.sparse)

    def precompile(self, state: CachedState, max_misses: int) -> None:
        """Compiles the exchange for every fill size up to `max_misses` rows per device
        and group (by running exchanges that move nothing), so no later step pauses to
        compile one."""
        size = 16
        while True:
            nothing = {b: _nothing_admitted() for b in state.maps}
            self._apply(state, _Admitted(nothing, self.exchange.build(state.host, [], [], size)))
            if size >= max_misses:
                return
            size *= 2

    # The tiers.

    def _admit(self, state: CachedState, ids: dict, upcoming, *, count: bool) -> _Admitted:
        """Admits a batch to every cache block and starts copying its misses over."""
        # The batch in flight may lose its slots: the exchange runs after its step on the
        # device (it takes the step's output state). An admitted batch not yet run may not.
        pinned = {} if state.ahead is None else {b: a.slots for b, a in state.ahead.admissions.items()}
        admissions = {}
        for block, slot_map in state.maps.items():
            admission = slot_map.admit(
                ids[block], pinned=pinned.get(block), upcoming=[u[block] for u in upcoming]
            )
            admissions[block] = admission
            if count:
                state.counts[block.table].add(admission)
        fills, reads = [], []
        for block, a in admissions.items():
            fetched = a.fill_ids + block.rows[0]
            state.writebacks.settle(block.table, fetched)  # a fetched row must be written back first
            gone = a.evicted_ids >= 0
            fills.append((block, a.fill_slots, fetched))
            reads.append((block, a.fill_slots[gone], a.evicted_ids[gone] + block.rows[0]))
        return _Admitted(admissions, self.exchange.build(state.host, fills, reads))

    def _apply(self, state: CachedState, admitted: _Admitted) -> None:
        """Runs an admission's exchange on the device once and queues its write-backs:
        the victims are read first, then the fills written in place (one program doing
        both would make XLA copy the whole table to keep the read before the write)."""
        if admitted.fills is None:
            return
        arrays, pieces = admitted.fills
        evicted = self._read(state.device, arrays)
        state.device = self._write(state.device, arrays)
        for group, (rows, row_state) in evicted.items():
            state.writebacks.push(pieces[group], rows, row_state)
        admitted.fills = None

    def _write_fn(self, device, arrays: dict):
        storage, slots, keys = self._parts(device)
        return self._with_parts(device, *self.exchange.write(storage, slots, keys, arrays))

    def _remapped(self, state: CachedState, batch: Batch) -> Batch:
        """The batch on the device with each cached feature's ids replaced by slots."""
        features = {}
        for name, bags in batch.sparse.features.items():
            table = self.config.feature(name).table
            if table in self.cached:
                slots = self._slots_of(state, table, np.asarray(bags.ids))
                if slots.min() < 0 and (slots[_valid(bags)] < 0).any():
                    raise ValueError(
                        f"table {table!r}: this batch's ids differ from those announced as the next "
                        "batch in the `upcoming` of the step before"
                    )
                # Padding positions (id 0, weight 0) may name an uncached id: any slot will do.
                bags = JaggedFeature(np.maximum(slots, 0), bags.lengths, bags.weights)
            features[name] = bags
        return self._place(dataclasses.replace(batch, sparse=JaggedBatch(features)))

    def _slots_of(self, state: CachedState, table: str, ids: np.ndarray) -> np.ndarray:
        """Each id's row in the slot table, -1 where it is not cached."""
        blocks = self.blocks[table]
        if len(blocks) == 1:
            return state.maps[blocks[0]].slot_of[ids]  # its slots start at 0
        which = np.searchsorted([b.rows[0] for b in blocks], ids, side="right") - 1
        out = np.full(ids.shape, -1, np.int32)
        for j, b in enumerate(blocks):
            here = (which == j) & (ids < b.rows[1])
            local = state.maps[b].slot_of[ids[here] - b.rows[0]]
            out[here] = np.where(local >= 0, local + b.slot_start, -1)
        return out

    # Checkpoints and inspection.

    def flush(self, state: CachedState) -> None:
        """Writes every cached row and its state back to the host tier (rows stay cached)."""
        if state.ahead is not None:
            self._apply(state, state.ahead)
        state.writebacks.drain()
        reads = []
        for block, slot_map in state.maps.items():
            slots, ids = slot_map.cached_ids()
            reads.append((block, slots, ids + block.rows[0]))
        arrays, pieces = self.exchange.build(state.host, [], reads)
        for group, (rows, row_state) in jax.device_get(self._read(state.device, arrays)).items():
            write(state.host, pieces[group], rows, row_state)

    def logical_tables(self, state: CachedState) -> dict[str, np.ndarray]:
        self.flush(state)
        out = self.trainer.logical_tables(self._bare(state.device))
        out.update({t: np.array(h.rows) for t, h in state.host.items()})
        return out

    def to_logical(self, state: CachedState) -> dict:
        """The uncached trainer's tree: cached tables and their state from the flushed
        host tier (copies: training goes on while a save writes them)."""
        self.flush(state)
        tree = self.trainer.to_logical(self._bare(state.device))
        for table, host in state.host.items():
            tree["tables"][table] = np.array(host.rows)
            tree["slots"][table] = {k: np.array(v) for k, v in host.state.items()}
        return tree

    def from_logical(self, template: CachedState, tree: dict) -> CachedState:
        """Restores an uncached or a cached run's tree; the caches start empty."""
        device_tree = {**tree, "tables": dict(tree["tables"]), "slots": dict(tree["slots"])}
        bare = self._bare(template.device)
        empty = self.trainer.to_logical(bare)
        for table in self.cached:
            device_tree["tables"][table] = empty["tables"][table]
            device_tree["slots"][table] = empty["slots"][table]
        state = self.init_state_like(template)
        state.device = self._keyed(self.trainer.from_logical(bare, device_tree))
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


def _valid(bags: JaggedFeature) -> np.ndarray:
    lengths = np.asarray(bags.lengths)
    return np.arange(bags.ids.shape[1])[None, :] < lengths[:, None]


def _batch_of(item) -> Batch:
    return item[0] if isinstance(item, tuple) else item


def _nothing_admitted() -> Admission:
    empty = np.zeros(0, np.int64)
    return Admission(empty.astype(np.int32), empty.astype(np.int32), empty, empty)
