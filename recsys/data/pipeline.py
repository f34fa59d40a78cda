"""Batches from a Dataset: seeded shuffling with exact resume positions, and prefetch.

Training order for epoch e: the chunks in a permutation seeded by (seed, e), each
chunk's examples in a permutation seeded by (seed, e, chunk). Batches are consecutive
runs of that stream; they may span chunks, and the last partial batch of an epoch is
dropped (at most batch_size - 1 examples per epoch; `steps_per_epoch` accounts for it).
Every batch comes with the `Position` just after it, so a checkpoint that stores the
position of the last batch trained on resumes with exactly the batches that would have
followed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from recsys.data.dataset import Dataset
from recsys.data.examples import Examples


@dataclasses.dataclass(frozen=True)
class Position:
    """The next example of the training stream: chunk `chunk` of epoch `epoch`'s order, at `offset`."""

    epoch: int = 0
    chunk: int = 0
    offset: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Position:
        return cls(**data)


def steps_per_epoch(dataset: Dataset, batch_size: int) -> int:
    steps = len(dataset) // batch_size
    if steps == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {len(dataset)} training examples")
    return steps


def chunk_order(dataset: Dataset, seed: int, epoch: int) -> np.ndarray:
    nonempty = np.flatnonzero(np.asarray(dataset.sizes) > 0)
    return nonempty[np.random.default_rng([seed, epoch, 0]).permutation(len(nonempty))]


def train_batches(
    dataset: Dataset, batch_size: int, *, seed: int, start: Position = Position(), shuffle: bool = True
) -> Iterator[tuple[Examples, Position]]:
    """An endless stream of (batch, position after it), from `start` on."""
    steps_per_epoch(dataset, batch_size)  # validates the batch size
    epoch, first_chunk, offset = start.epoch, start.chunk, start.offset
    while True:
        order = chunk_order(dataset, seed, epoch) if shuffle else np.flatnonzero(np.asarray(dataset.sizes))
        sizes = np.asarray(dataset.sizes)[order]
        left_after = np.concatenate([np.cumsum(sizes[::-1])[::-1][1:], [0]])  # examples in later chunks
        pending: list[Examples] = []
        have = 0
        for k in range(first_chunk, len(order)):
            chunk = dataset.chunk(int(order[k]))
            if shuffle:
                chunk = chunk.take(
                    np.random.default_rng([seed, epoch, 1, int(order[k])]).permutation(len(chunk))
                )
            while offset < len(chunk):
                take = min(batch_size - have, len(chunk) - offset)
                pending.append(chunk.slice(offset, offset + take))
                have += take
                offset += take
                if have == batch_size:
                    after = Position(epoch, k, offset) if offset < len(chunk) else Position(epoch, k + 1, 0)
                    if len(chunk) - offset + left_after[k] < batch_size:  # only the dropped remainder is left
                        after = Position(epoch + 1, 0, 0)
                    yield Examples.concat(pending), after
                    pending, have = [], 0
            offset = 0
        # An epoch ending mid-batch drops the partial batch; a resume position never points into it.
        epoch, first_chunk, offset = epoch + 1, 0, 0


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[Examples, int]]:
    """Every example once, in file order: (batch, valid count); the last batch is padded
    with copies of its first example up to batch_size so shapes stay static."""
    pending, have = [], 0
    for i in range(dataset.num_chunks):
        chunk = dataset.chunk(i)
        offset = 0
        while offset < len(chunk):
            take = min(batch_size - have, len(chunk) - offset)
            pending.append(chunk.slice(offset, offset + take))
            have, offset = have + take, offset + take
            if have == batch_size:
                yield Examples.concat(pending), batch_size
                pending, have = [], 0
    if have:
        part = Examples.concat(pending)
        pad = part.take(np.zeros(batch_size - have, np.int64))
        yield Examples.concat([part, pad]), have


class Prefetcher:
    """Runs `fn` over an iterator in a background thread, `depth` items ahead.

    Host parsing, shuffling and packing then overlap the device step (JAX releases the
    GIL while a step runs). An exception in the thread is re-raised by `__next__`;
    `close()` (or leaving a `with` block) stops the thread.
    """

    _DONE = object()

    def __init__(self, items: Iterator, fn: Callable = lambda x: x, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, fn), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, items, fn):
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put((True, fn(item)))
            self._put((True, self._DONE))
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        ok, item = self._queue.get()
        if not ok:
            self.close()
            raise item
        if item is self._DONE:
            self.close()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
