"""Dense columns chosen a transform each from the training rows (`DenseTransform.AUTO`).

A count-like column (no negative values, a long right tail: skewness above
`SKEWED`) takes the log transform Criteo's counts take, sign(x) * log(1 + |x|). Any
other column is standardized, (x - mean) / std over the training rows: a year (about
1990) or an age enters the model centred and at unit scale, not as a large near-constant.
The choice and the statistics are part of the schema, saved with every checkpoint, so
evaluation data and a resumed run are transformed alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SKEWED = 2.0  # skewness above which a non-negative column counts as count-like


@dataclasses.dataclass(frozen=True)
class DenseScale:
    """How one dense column is transformed: "log", or "standardize" with its statistics."""

    kind: str
    mean: float = 0.0
    std: float = 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class DenseStats:
    """Running moments of every dense column over the training rows (NaNs left out)."""

    def __init__(self, columns: int):
        self.count = np.zeros(columns)
        self.sums = np.zeros((3, columns))  # sum of x, x^2, x^3
        self.low = np.full(columns, np.inf)

    def observe(self, dense: np.ndarray) -> None:
        """Adds rows [rows, columns]."""
        x = np.asarray(dense, np.float64)
        finite = np.isfinite(x)
        self.count += finite.sum(axis=0)
        x = np.where(finite, x, 0.0)
        for power in range(3):
            self.sums[power] += (x ** (power + 1)).sum(axis=0)
        self.low = np.minimum(self.low, np.where(finite, x, np.inf).min(axis=0, initial=np.inf))

    def scales(self) -> tuple[DenseScale, ...]:
        """Each column's transform (a column never seen is left as it is)."""
        n = np.maximum(self.count, 1)
        mean = self.sums[0] / n
        var = np.maximum(self.sums[1] / n - mean**2, 0.0)
        third = self.sums[2] / n - 3 * mean * self.sums[1] / n + 2 * mean**3
        std = np.sqrt(var)
        skew = np.where(std > 0, third / np.maximum(std, 1e-300) ** 3, 0.0)
        out = []
        for i in range(len(mean)):
            if self.low[i] >= 0 and skew[i] > SKEWED:
                out.append(DenseScale("log"))
            else:
                out.append(DenseScale("standardize", float(mean[i]), float(std[i]) if std[i] > 0 else 1.0))
        return tuple(out)


def transform(dense: np.ndarray, scales: tuple[DenseScale, ...]) -> np.ndarray:
    """[rows, columns] float32, each column by its scale."""
    out = np.empty_like(dense)
    for i, scale in enumerate(scales):
        x = dense[:, i]
        if scale.kind == "log":
            out[:, i] = np.sign(x) * np.log1p(np.abs(x))
        else:
            out[:, i] = (x - np.float32(scale.mean)) / np.float32(scale.std)
    return out
