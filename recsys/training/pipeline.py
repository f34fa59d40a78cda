"""Train pipelines: what of the next batch's work a step starts while its own runs.

`none`: each step transfers its batch, routes its ids to their owners and computes, in
that order.

`sparse_dist` (TorchRec's `TrainPipelineSparseDist`, in one compiled step): the step of
batch i also routes batch i+1's ids to the owners of their rows, after its own last
collective, so that all-to-all runs beside step i's sparse and dense updates instead of
ahead of step i+1's lookup. The batches' host-to-device copies are queued ahead by the
input pipeline (`recsys.data.Prefetcher` places batches i+1.. while step i runs). Routing
reads the batch only, never the tables, so the result is that of `none`, bit for bit.
On one device there is nothing to route, and `sparse_dist` runs the plain step.

`semi_sync` (jax-tpu-embedding's and TorchRec's semi-synchronous pipelines): the step of
batch i first looks up batch i+1's activations, from the tables before step i's sparse
update, so the lookup runs beside step i's dense forward and backward. Batch i+1 then
trains on rows one update late: not exact; its quality cost is measured in
benchmarks/README.md.

What a step prepares for the next (the routed ids, the activations) lives in
`train_steps`, never in the train state: a checkpoint holds no half-routed batch, and a
resumed run prepares its first batch by itself (`carry_step`). A run resumed under
`semi_sync` thus looks that batch up with fresh rows, as `none` would.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator


class Pipeline(str, enum.Enum):
    NONE = "none"
    SPARSE_DIST = "sparse_dist"
    SEMI_SYNC = "semi_sync"


_END = object()


def train_steps(trainer, state, items: Iterable) -> Iterator[tuple[object, object, object]]:
    """Trains on every item (a placed batch, or a tuple whose first element is one) as
    `trainer.pipeline` says; yields (state after the item's step, its loss, the item).

    The generator owns the state between steps: the state it yields is for reading and
    saving (checkpoints, evaluation), and the next step donates it. It reads one item
    ahead of the step it runs."""
    if pipeline_of(trainer) is Pipeline.NONE:
        for item in items:
            state, loss = trainer.train_step(state, _batch_of(item))
            yield state, loss, item
        return
    source = iter(items)
    current = next(source, _END)
    if current is _END:
        return
    carry = trainer.carry_step(state, _batch_of(current))
    while current is not _END:
        following = next(source, _END)
        # The last step prepares its own batch again, unused: one compiled step serves all.
        upcoming = _batch_of(current if following is _END else following)
        state, carry, loss = trainer.pipelined_step(state, carry, _batch_of(current), upcoming)
        yield state, loss, current
        current = following


def compiled_step(trainer, state, batch):
    """The step most of a run's steps take, compiled ahead of time (its HLO can be read;
    later calls find it in JAX's cache): the plain one, or the pipelined one, which takes
    what the step before prepared of its batch and prepares the next. `state` and
    `batch` may be arrays or `jax.ShapeDtypeStruct`s."""
    if pipeline_of(trainer) is Pipeline.NONE:
        return trainer.train_step.lower(state, batch).compile()
    carry = trainer.carry_step.lower(state, batch).out_info
    return trainer.pipelined_step.lower(state, carry, batch, batch).compile()


def pipeline_of(trainer) -> Pipeline:
    """The pipeline `train_steps` runs for `trainer`: its own, where it has a pipelined
    step; else (a cached trainer) `none`."""
    return Pipeline(trainer.pipeline) if hasattr(trainer, "pipelined_step") else Pipeline.NONE


def _batch_of(item):
    return item[0] if isinstance(item, tuple) else item
