"""The cache on a mesh: each owner of a cached table's rows caches its own block.

A cached table keeps its plan's strategy and owners; the devices hold its slot table
(`recsys.cache.blocks`), planned alike, so a row and its slot sit on the same device and
the step routes slots as it would route rows. The host tier holds the whole table; the
exchange sends each owner only its block's rows and columns. A narrow group's slots draw
their rounding bits as the rows they hold do uncached (`recsys.sharded_update.ROW_KEY`),
so cached training equals uncached bitwise here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx

from mesh.meshes import mesh_spec
from mesh.plan import ShardingPlan
from mesh.sharded import GroupLayout, Placement, sharded_layout
from recsys.batching import Batch
from recsys.cache.blocks import CacheBlock, cached_config, planned_blocks, slot_plan_of
from recsys.cache.config import CacheConfig
from recsys.cache.exchange import Exchange, GroupStorage, Target
from recsys.cache.trainer import CachedTrainer
from recsys.sharded_update import ROW_KEY
from recsys.training.sharded import ShardedState, ShardedTrainer


class ShardedCachedTrainer(CachedTrainer):
    """A `ShardedTrainer` whose tables named in `cache.load_factors` live in host memory,
    each owner caching its block of them on its device. Arguments as `ShardedTrainer`'s,
    with `cache`; the protocol as `CachedTrainer`'s. One process (the host tier of
    several processes is not split yet)."""

    def __init__(
        self,
        model: nnx.Module | Callable[[], nnx.Module],
        dense_optimizer: optax.GradientTransformation,
        cache: CacheConfig,
        plan: ShardingPlan,
        mesh: jax.sharding.Mesh,
        **trainer_options,
    ):
        if jax.process_count() > 1:
            raise ValueError("cached tables train in one process; run without --cache-load-factor on several")
        self._setup(model, cache)
        self.mesh, self.plan = mesh, plan
        spec = mesh_spec(mesh)
        self.blocks, slot_plans = {}, {}
        for name, table in self.cached.items():
            self.blocks[name], slot_plans[name] = planned_blocks(
                table, cache.load_factors[name], plan.tables[name], spec
            )
        slot_rows = {t: max(s.rows[1] for s in p.shards) for t, p in slot_plans.items()}
        self.device_config = cached_config(self.config, self.blocks, slot_rows)
        # Bucket capacities follow the ids each block serves, as uncached.
        shares = {
            t: {b.slot_start: b.row_count / self.cached[t].rows for b in bs} for t, bs in self.blocks.items()
        }
        self.trainer = ShardedTrainer(
            self._device_model(),
            dense_optimizer,
            slot_plan_of(plan, slot_plans),
            mesh,
            id_shares=shares,
            **trainer_options,
        )
        self.layout = self.trainer.layout
        self._full_sharded = sharded_layout(plan, self.config.tables, mesh)
        self.exchange = Exchange(self._groups(), self._targets(), mesh)
        self._compile_exchange()

    def _groups(self) -> dict[str, GroupStorage]:
        out = {}
        for g in self.layout.groups:
            cached = tuple(t for t in g.tables if t in self.cached)
            if cached:
                narrow = self.cached[cached[0]].rounds_stochastically
                out[g.name] = GroupStorage(g.name, not g.data_parallel, g.block_rows, g.width, narrow, cached)
        return out

    def _targets(self) -> dict[CacheBlock, list[Target]]:
        """Each block's slots on each of its owners, keyed by the rows they stand for."""
        out = {}
        for table, blocks in self.blocks.items():
            g = self.layout.table_group(table)
            for block in blocks:
                out[block] = [
                    Target(
                        g.name,
                        q.device,
                        q.offset,
                        q.cols,
                        self._full_placement(q, block.rows).offset - block.rows[0],
                    )
                    for q in g.placements_of(table)
                    if q.rows[0] == block.slot_start
                ]
        return out

    def _full_placement(self, slot: Placement, rows: tuple[int, int]) -> Placement:
        """The uncached layout's placement of the rows `rows` that `slot` caches."""
        full = self._full_sharded.table_group(slot.table)
        return next(
            p
            for p in full.placements_of(slot.table)
            if (p.device, p.rows, p.cols) == (slot.device, rows, slot.cols)
        )

    # What differs from one device.

    def _keyed(self, device: ShardedState) -> ShardedState:
        slots = dict(device.slots)
        for name, group in self.exchange.groups.items():
            if group.keyed:
                keys = self._initial_keys(self.layout.group(name))
                slots[name] = {
                    **slots[name],
                    ROW_KEY: jax.device_put(keys, self.layout.group(name).sharding(self.mesh)),
                }
        return dataclasses.replace(device, slots=slots)

    def _initial_keys(self, g: GroupLayout) -> np.ndarray:
        """An uncached table's rows round as in the uncached layout (their offsets there
        differ: the cached tables take fewer rows); slots get their keys when filled."""
        keys = np.zeros(g.shape(False), np.int32)
        for q in g.placements:
            if q.table in self.cached:
                continue
            p = self._full_placement(q, q.rows)
            at = slice(q.offset, q.offset + q.row_count)
            keys[at if q.device < 0 else (q.device, at)] = np.arange(q.row_count) + p.offset
        return keys

    def _bare(self, device: ShardedState) -> ShardedState:
        slots = {g: {k: v for k, v in s.items() if k != ROW_KEY} for g, s in device.slots.items()}
        return dataclasses.replace(device, slots=slots)

    def _parts(self, device: ShardedState) -> tuple[dict, dict, dict]:
        keys = {g: s[ROW_KEY] for g, s in device.slots.items() if ROW_KEY in s}
        return device.tables, self._bare(device).slots, keys

    def _with_parts(self, device: ShardedState, storage: dict, slots: dict, keys: dict) -> ShardedState:
        slots = {g: {**s, **({ROW_KEY: keys[g]} if g in keys else {})} for g, s in slots.items()}
        return dataclasses.replace(device, tables=storage, slots=slots)

    def _place(self, batch: Batch) -> Batch:
        return self.trainer.shard_batch(batch)
