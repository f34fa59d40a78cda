"""Jagged sparse batches with static shapes, and the host-side packer that builds them.

A feature's bags are stored padded to the feature's `max_ids`: `ids` is `[batch, max_ids]`
int32 and `lengths` is `[batch]`; positions at or past a sample's length are padding
(their id is 0 and they are masked out everywhere). Shapes depend only on the batch size
and the specs, never on the bag lengths of a batch, so a jitted step compiles once.

Ids are validated on the host while packing, where an error can still name the feature
and the sample; out-of-range ids and over-long bags are errors unless the caller opts
into a policy that rewrites them and counts what it rewrote.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

import jax
import numpy as np

from recsys.specs import EmbeddingConfig, FeatureSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaggedFeature:
    """The bags of one feature for one batch."""

    ids: jax.Array  # [batch, max_ids] int32; padding positions hold 0
    lengths: jax.Array  # [batch] int32 in [0, max_ids]
    weights: jax.Array | None = None  # [batch, max_ids] float32, weighted features only

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    @property
    def max_ids(self) -> int:
        return self.ids.shape[1]

    def valid_mask(self) -> jax.Array:
        """[batch, max_ids] bool: which positions hold a real id."""
        positions = jax.numpy.arange(self.max_ids, dtype=self.lengths.dtype)
        return positions[None, :] < self.lengths[:, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaggedBatch:
    """All sparse features of one batch, keyed by feature name."""

    features: dict[str, JaggedFeature]

    def __getitem__(self, name: str) -> JaggedFeature:
        return self.features[name]

    @property
    def batch_size(self) -> int:
        return next(iter(self.features.values())).batch_size


@dataclasses.dataclass(frozen=True)
class RaggedIds:
    """Host-side ragged bags in CSR form: sample i owns values[offsets[i]:offsets[i+1]]."""

    values: np.ndarray  # [total_ids] integer ids
    lengths: np.ndarray  # [batch] bag lengths
    weights: np.ndarray | None = None  # [total_ids] float, weighted features only

    @classmethod
    def from_lists(cls, bags, weights=None) -> RaggedIds:
        """From a list of per-sample id lists (and optionally matching weight lists)."""
        lengths = np.array([len(b) for b in bags], dtype=np.int64)
        values = np.fromiter((i for b in bags for i in b), dtype=np.int64, count=int(lengths.sum()))
        w = None
        if weights is not None:
            w = np.fromiter((x for b in weights for x in b), dtype=np.float32, count=int(lengths.sum()))
        return cls(values=values, lengths=lengths, weights=w)


class OutOfRange(str, enum.Enum):
    """What the packer does with an id outside [0, rows)."""

    ERROR = "error"  # raise, naming the feature and sample (default)
    MODULO = "modulo"  # id mod rows (Python semantics, so negatives land in range)
    HASH = "hash"  # a 64-bit mixing hash of the id, mod rows


class Overlong(str, enum.Enum):
    """What the packer does with a bag longer than the feature's max_ids."""

    ERROR = "error"  # raise, naming the feature and sample (default)
    TRUNCATE = "truncate"  # keep the first max_ids ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputPolicy:
    out_of_range: OutOfRange = OutOfRange.ERROR
    overlong: Overlong = Overlong.ERROR

    def __post_init__(self):
        object.__setattr__(self, "out_of_range", OutOfRange(self.out_of_range))
        object.__setattr__(self, "overlong", Overlong(self.overlong))


@dataclasses.dataclass
class PackReport:
    """Per-feature counts of what a policy rewrote; empty when nothing was."""

    remapped_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    truncated_bags: dict[str, int] = dataclasses.field(default_factory=dict)

    def merge(self, other: PackReport) -> None:
        for mine, theirs in (
            (self.remapped_ids, other.remapped_ids),
            (self.truncated_ids, other.truncated_ids),
            (self.truncated_bags, other.truncated_bags),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value

    def total(self) -> int:
        return sum(self.remapped_ids.values()) + sum(self.truncated_ids.values())

    def summary(self) -> str:
        parts = []
        for label, counts in (
            ("ids remapped into range", self.remapped_ids),
            ("ids dropped from over-long bags", self.truncated_ids),
        ):
            if counts:
                detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
                parts.append(f"{sum(counts.values())} {label} ({detail})")
        return "; ".join(parts) if parts else "no ids remapped or truncated"


def hash_ids(ids: np.ndarray, rows: int) -> np.ndarray:
    """Maps arbitrary int64 ids into [0, rows) with the splitmix64 finalizer."""
    x = ids.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(rows)).astype(np.int64)


def pack_feature(
    spec: FeatureSpec,
    rows: int,
    ragged: RaggedIds,
    policy: InputPolicy = InputPolicy(),
    report: PackReport | None = None,
) -> JaggedFeature:
    """Packs one feature's ragged bags into the padded static-shape layout.

    Args:
      spec: the feature; `spec.max_ids` is the padded width.
      rows: the row count of the feature's table; valid ids are [0, rows).
      ragged: CSR bags, one per sample.
      policy: what to do with out-of-range ids and over-long bags.
      report: counts of rewritten ids are added here.
    Returns:
      numpy-backed JaggedFeature with ids [batch, max_ids] int32, lengths [batch] int32.
    """
    values, lengths, weights = _checked_bags(spec, ragged)
    batch, width = len(lengths), spec.max_ids
    values = _ids_in_range(spec, rows, values, lengths, policy, report)
    _check_bag_lengths(spec, lengths, policy, report)
    # Scatter each id to (sample, position); positions >= max_ids are the truncated ones.
    starts = np.cumsum(lengths) - lengths
    sample = np.repeat(np.arange(batch), lengths)
    position = np.arange(len(values)) - np.repeat(starts, lengths)
    keep = position < width
    ids = np.zeros((batch, width), np.int32)
    ids[sample[keep], position[keep]] = values[keep]
    packed_weights = None
    if weights is not None:
        packed_weights = np.zeros((batch, width), np.float32)
        packed_weights[sample[keep], position[keep]] = weights[keep]
    return JaggedFeature(ids=ids, lengths=np.minimum(lengths, width).astype(np.int32), weights=packed_weights)


def _checked_bags(spec: FeatureSpec, ragged: RaggedIds):
    """(ids, lengths, weights or None) as NumPy, or a ValueError naming what is malformed."""
    values = np.asarray(ragged.values)
    lengths = np.asarray(ragged.lengths).astype(np.int64)
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError(f"feature {spec.name!r}: lengths must be a 1-D array of counts >= 0")
    if values.ndim != 1 or len(values) != lengths.sum():
        raise ValueError(
            f"feature {spec.name!r}: {len(values)} ids but the lengths add up to {lengths.sum()}"
        )
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"feature {spec.name!r}: ids must be integers, got dtype {values.dtype}")
    if spec.weighted != (ragged.weights is not None):
        need = "needs" if spec.weighted else "takes no"
        raise ValueError(f"feature {spec.name!r} {need} per-id weights")
    weights = None if ragged.weights is None else np.asarray(ragged.weights, np.float32)
    if weights is not None:
        if weights.shape != values.shape:
            raise ValueError(f"feature {spec.name!r}: {len(weights)} weights for {len(values)} ids")
        if not np.isfinite(weights).all():
            bad = _sample_of(np.flatnonzero(~np.isfinite(weights))[0], lengths)
            raise ValueError(f"feature {spec.name!r}: non-finite weight in sample {bad}")
    return values, lengths, weights


def _ids_in_range(spec: FeatureSpec, rows: int, values, lengths, policy: InputPolicy, report) -> np.ndarray:
    """`values`, with ids outside [0, rows) an error or rewritten as `policy` says (counted)."""
    bad = (values < 0) | (values >= rows)
    if not bad.any():
        return values
    if policy.out_of_range is OutOfRange.ERROR:
        first = np.flatnonzero(bad)[0]
        raise ValueError(
            f"feature {spec.name!r}: id {values[first]} in sample {_sample_of(first, lengths)} "
            f"is outside [0, {rows}) ({int(bad.sum())} such ids in this batch); "
            "pass InputPolicy(out_of_range='modulo'|'hash') to map ids into range"
        )
    values = values.astype(np.int64)
    if policy.out_of_range is OutOfRange.MODULO:
        values = np.where(bad, values % rows, values)
    else:
        values = np.where(bad, hash_ids(values, rows), values)
    if report is not None:
        report.remapped_ids[spec.name] = report.remapped_ids.get(spec.name, 0) + int(bad.sum())
    return values


def _check_bag_lengths(spec: FeatureSpec, lengths, policy: InputPolicy, report) -> None:
    """Bags longer than `spec.max_ids`: an error, or truncated as `policy` says (counted)."""
    width = spec.max_ids
    over = lengths > width
    if not over.any():
        return
    if policy.overlong is Overlong.ERROR:
        first = int(np.flatnonzero(over)[0])
        raise ValueError(
            f"feature {spec.name!r}: sample {first} has {lengths[first]} ids but max_ids is "
            f"{width} ({int(over.sum())} such bags in this batch); raise max_ids or pass "
            "InputPolicy(overlong='truncate')"
        )
    if report is not None:
        dropped = int((lengths[over] - width).sum())
        report.truncated_ids[spec.name] = report.truncated_ids.get(spec.name, 0) + dropped
        report.truncated_bags[spec.name] = report.truncated_bags.get(spec.name, 0) + int(over.sum())


def pack_batch(
    config: EmbeddingConfig,
    sparse: Mapping[str, RaggedIds],
    policy: InputPolicy = InputPolicy(),
    report: PackReport | None = None,
) -> JaggedBatch:
    """Packs every feature of `config` from host ragged data; see `pack_feature`."""
    missing = [f.name for f in config.features if f.name not in sparse]
    extra = sorted(set(sparse) - {f.name for f in config.features})
    if missing or extra:
        raise ValueError(f"sparse input: missing features {missing}, unknown features {extra}")
    features = {}
    batch = None
    for spec in config.features:
        packed = pack_feature(spec, config.table(spec.table).rows, sparse[spec.name], policy, report)
        if batch is not None and packed.batch_size != batch:
            raise ValueError(
                f"feature {spec.name!r} has {packed.batch_size} samples, earlier features {batch}"
            )
        batch = packed.batch_size
        features[spec.name] = packed
    return JaggedBatch(features=features)


def _sample_of(flat_index: int, lengths: np.ndarray) -> int:
    return int(np.searchsorted(np.cumsum(lengths), flat_index, side="right"))
