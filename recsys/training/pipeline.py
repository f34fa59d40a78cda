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

The routed ids live in `train_steps`, never in the train state: a checkpoint holds no
half-routed batch, and a resumed run routes its first batch by itself (`route_step`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator


class Pipeline(str, enum.Enum):
    NONE = "none"
    SPARSE_DIST = "sparse_dist"


_END = object()


def train_steps(trainer, state, items: Iterable) -> Iterator[tuple[object, object, object]]:
    """Trains on every item (a placed batch, or a tuple whose first element is one) as
    `trainer.pipeline` says; yields (state after the item's step, its loss, the item).

    The generator owns the state between steps: the state it yields is for reading and
    saving (checkpoints, evaluation), and the next step donates it. It reads one item
    ahead of the step it runs."""
    if Pipeline(getattr(trainer, "pipeline", Pipeline.NONE)) is Pipeline.NONE or not hasattr(
        trainer, "pipelined_step"
    ):
        for item in items:
            state, loss = trainer.train_step(state, _batch_of(item))
            yield state, loss, item
        return
    source = iter(items)
    current = next(source, _END)
    if current is _END:
        return
    routed = trainer.route_step(_batch_of(current))
    while current is not _END:
        following = next(source, _END)
        # The last step routes its own batch again, unused: one compiled step serves all.
        upcoming = _batch_of(current if following is _END else following)
        state, routed, loss = trainer.pipelined_step(state, routed, _batch_of(current), upcoming)
        yield state, loss, current
        current = following


def _batch_of(item):
    return item[0] if isinstance(item, tuple) else item
