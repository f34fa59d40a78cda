"""Host-side examples, read errors and the skip policy shared by every reader.

`Examples` is a block of training examples in NumPy: dense features, ragged sparse bags
(already encoded to table row ids) and labels. Readers produce it chunk by chunk; the
pipeline shuffles, batches and packs it for the device.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np

from recsys.sparse import RaggedIds


@dataclasses.dataclass
class Examples:
    dense: np.ndarray  # [n, num_dense] float32
    sparse: dict[str, RaggedIds]  # {feature: bags of row ids}
    labels: np.ndarray  # [n] float32 in {0, 1}

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> Examples:
        return self.take(np.arange(start, min(stop, len(self))))

    def take(self, indices: np.ndarray) -> Examples:
        """The examples at `indices`, in that order (bags move with their samples)."""
        indices = np.asarray(indices, np.int64)
        return Examples(
            dense=self.dense[indices],
            sparse={name: _take_bags(bags, indices) for name, bags in self.sparse.items()},
            labels=self.labels[indices],
        )

    @staticmethod
    def concat(parts: Sequence[Examples]) -> Examples:
        if len(parts) == 1:
            return parts[0]
        sparse = {}
        for name, first in parts[0].sparse.items():
            bags = [p.sparse[name] for p in parts]
            weights = None if first.weights is None else np.concatenate([b.weights for b in bags])
            sparse[name] = RaggedIds(
                np.concatenate([b.values for b in bags]), np.concatenate([b.lengths for b in bags]), weights
            )
        return Examples(
            dense=np.concatenate([p.dense for p in parts]),
            sparse=sparse,
            labels=np.concatenate([p.labels for p in parts]),
        )


def _take_bags(bags: RaggedIds, indices: np.ndarray) -> RaggedIds:
    lengths = np.asarray(bags.lengths, np.int64)
    starts = np.cumsum(lengths) - lengths
    new_lengths = lengths[indices]
    # Flat source position of every id of the new bags: its bag's start + its rank in the bag.
    rank = np.arange(int(new_lengths.sum())) - np.repeat(np.cumsum(new_lengths) - new_lengths, new_lengths)
    source = np.repeat(starts[indices], new_lengths) + rank
    weights = None if bags.weights is None else bags.weights[source]
    return RaggedIds(bags.values[source], new_lengths, weights)


class DataError(ValueError):
    """Malformed input, located by file and line (or row) and, when known, column."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, column=None):
        self.message, self.path, self.line, self.column = message, path, line, column
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        if column is not None:
            where += f"column {column!r}: "
        super().__init__(where + message)


class OnError(str, enum.Enum):
    """What a reader does with a malformed line or row."""

    RAISE = "raise"  # stop with a DataError naming the file and line (default)
    SKIP = "skip"  # leave the line out and count it in the ReadReport


@dataclasses.dataclass
class ReadReport:
    """What a reader left out, by reason, with the first few locations for the log."""

    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: list[str] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    def record(self, error: DataError) -> None:
        self.skipped[error.message] = self.skipped.get(error.message, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        if not self.skipped:
            return "no lines skipped"
        reasons = "; ".join(
            f"{n} x {reason}" for reason, n in sorted(self.skipped.items(), key=lambda x: -x[1])
        )
        first = "\n    ".join(self.examples)
        return f"{self.total()} malformed lines skipped ({reasons})\n    first: {first}"
