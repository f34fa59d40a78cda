"""What a dataset's columns are and how raw tokens become table row ids.

Every reader parses lines (or Parquet rows) into a `RawChunk` of string tokens; the
`DataSchema` encodes it into `Examples`. A schema is built from the training data by a
`SchemaBuilder` (vocabularies, table sizes and bag lengths chosen from the data unless
given), is JSON-serializable, and is saved next to checkpoints so a resumed run encodes
ids exactly as the first run did.

Row 0 of every table is reserved: it is the id of a missing value (an empty Criteo
field) and of a token outside the vocabulary, so unseen ids in evaluation data have a
row and never raise.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections import Counter
from collections.abc import Sequence

import numpy as np

from recsys.data.dense import DenseScale, DenseStats
from recsys.data.dense import transform as transform_dense
from recsys.data.examples import Examples
from recsys.sparse import RaggedIds, hash_ids
from recsys.specs import EmbeddingConfig, FeatureSpec, Pooling, SparseOptimizerSpec, TableSpec

MISSING = ""  # the token of an empty field where empty means "missing"; encodes to row 0
MISSING_INT = -1  # the same for integer tokens (Criteo's hex values); valid ones are >= 0


class Encoding(str, enum.Enum):
    HASH = "hash"  # row = 1 + hash(token) mod (rows - 1): any table size, collisions allowed
    VOCAB = "vocab"  # row = 1 + rank of the token by training-data frequency; unseen -> 0


class DenseTransform(str, enum.Enum):
    NONE = "none"
    LOG = "log"  # sign(x) * log(1 + |x|): the usual Criteo transform, defined for negatives
    AUTO = "auto"  # per column from the training rows: log, or standardization (`recsys.data.dense`)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseColumn:
    """One sparse column: one feature with its own table.

    Attributes:
      name: the feature and table name.
      encoding: hash or vocab.
      rows: table rows, row 0 included.
      max_ids: the padded bag width (1 for a single-valued column).
      vocab: tokens in row order from row 1 (vocab encoding only); rows past the
        vocabulary stay unused.
      weighted: bags carry per-id values (libFM `idx:val` with val != 1).
      sequence: the bag is a history, looked up unpooled ([batch, max_ids, dim]), for
        models that pool it themselves (attention).
      pooling: how the bag pools, when not the default (mean; weighted bags sum).
    """

    name: str
    encoding: Encoding
    rows: int
    max_ids: int
    vocab: tuple[str, ...] | tuple[int, ...] | None = None
    weighted: bool = False
    sequence: bool = False
    pooling: Pooling | None = None

    def __post_init__(self):
        object.__setattr__(self, "encoding", Encoding(self.encoding))
        if self.pooling is not None:
            object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.rows < 2:
            raise ValueError(f"sparse column {self.name!r}: rows must be >= 2 (row 0 is reserved)")
        if self.encoding is Encoding.VOCAB and (self.vocab is None or len(self.vocab) > self.rows - 1):
            raise ValueError(f"sparse column {self.name!r}: a vocab column needs at most rows - 1 tokens")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSchema:
    dense: tuple[str, ...]
    sparse: tuple[SparseColumn, ...]
    dense_transform: DenseTransform = DenseTransform.LOG
    dense_scales: tuple[DenseScale, ...] | None = None  # AUTO: each dense column's transform

    def __post_init__(self):
        object.__setattr__(self, "dense_transform", DenseTransform(self.dense_transform))
        scaled = self.dense_scales is not None and len(self.dense_scales) == len(self.dense)
        if (self.dense_transform is DenseTransform.AUTO) != scaled:
            raise ValueError(
                "the auto dense transform needs one scale per dense column, and only it takes them"
            )
        object.__setattr__(self, "_lookup", {})  # vocab dicts, built on first encode
        if not self.sparse:
            raise ValueError("a dataset needs at least one sparse column")

    def embedding_config(self, dim: int, optimizer: SparseOptimizerSpec) -> EmbeddingConfig:
        """One table per sparse column; bags are mean-pooled (weighted ones weight-summed),
        sequence columns left unpooled."""
        tables = tuple(TableSpec(name=c.name, rows=c.rows, dim=dim, optimizer=optimizer) for c in self.sparse)
        features = tuple(
            FeatureSpec(
                name=c.name,
                table=c.name,
                max_ids=c.max_ids,
                weighted=c.weighted,
                pooling=c.pooling
                or (Pooling.NONE if c.sequence else Pooling.SUM if c.weighted else Pooling.MEAN),
            )
            for c in self.sparse
        )
        return EmbeddingConfig(tables=tables, features=features)

    def encode(self, raw: RawChunk) -> Examples:
        dense = np.asarray(raw.dense, np.float32).reshape(len(raw.labels), len(self.dense))
        if self.dense_transform is DenseTransform.LOG:
            dense = np.sign(dense) * np.log1p(np.abs(dense))
        elif self.dense_transform is DenseTransform.AUTO:
            dense = transform_dense(dense, self.dense_scales)
        sparse = {}
        for column, bags in zip(self.sparse, raw.bags):
            ids = self._encode_tokens(column, bags.tokens)
            weights = None
            if column.weighted:
                weights = np.asarray(bags.weights, np.float32)
            sparse[column.name] = RaggedIds(ids, np.asarray(bags.lengths, np.int64), weights)
        return Examples(dense=dense, sparse=sparse, labels=np.asarray(raw.labels, np.float32))

    def _encode_tokens(self, column: SparseColumn, tokens: Sequence[str]) -> np.ndarray:
        if column.encoding is Encoding.VOCAB:
            table = self._lookup.get(column.name)
            if table is None:
                table = {token: row for row, token in enumerate(column.vocab, start=1)}
                self._lookup[column.name] = table
            get = table.get
            seq = tokens.tolist() if isinstance(tokens, np.ndarray) else tokens
            return np.fromiter((get(t, 0) for t in seq), np.int64, count=len(seq))
        return hash_tokens(tokens, column.rows)

    # -- serialization -------------------------------------------------------------

    def to_json(self) -> dict:
        return {
            "dense": list(self.dense),
            "dense_transform": self.dense_transform.value,
            **(
                {}
                if self.dense_scales is None
                else {"dense_scales": [d.to_json() for d in self.dense_scales]}
            ),
            "sparse": [
                {
                    "name": c.name,
                    "encoding": c.encoding.value,
                    "rows": c.rows,
                    "max_ids": c.max_ids,
                    "weighted": c.weighted,
                    "vocab": None if c.vocab is None else list(c.vocab),
                    # Only when set: schemas from before sequence columns keep their fingerprint.
                    **({"sequence": True} if c.sequence else {}),
                    **({"pooling": c.pooling.value} if c.pooling else {}),
                }
                for c in self.sparse
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> DataSchema:
        sparse = tuple(
            SparseColumn(**{**c, "vocab": None if c["vocab"] is None else tuple(c["vocab"])})
            for c in data["sparse"]
        )
        scales = data.get("dense_scales")
        return cls(
            dense=tuple(data["dense"]),
            sparse=sparse,
            dense_transform=data["dense_transform"],
            dense_scales=None if scales is None else tuple(DenseScale(**d) for d in scales),
        )

    def fingerprint(self) -> str:
        """A short digest of the encoding: equal fingerprints encode every token alike."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def hash_tokens(tokens, rows: int) -> np.ndarray:
    """Stable hash of tokens into [1, rows); MISSING ("") and MISSING_INT (-1) -> 0.

    Integer tokens go straight to the splitmix64 finalizer. String tokens are first
    reduced by FNV-1a over their Unicode code points, vectorized over a whole column (the
    same in every process and platform, unlike Python's salted `hash`).
    """
    if len(tokens) and isinstance(tokens[0], (int, np.integer)):
        values = np.asarray(tokens, np.int64)
        return np.where(values < 0, 0, 1 + hash_ids(values, rows - 1))
    codes = np.ascontiguousarray(np.asarray(tokens, dtype=str))
    n = codes.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    width = max(codes.dtype.itemsize // 4, 1)
    points = codes.view(np.uint32).reshape(n, width) if codes.dtype.itemsize else np.zeros((n, 1), np.uint32)
    lengths = np.char.str_len(codes)
    h = np.full(n, 0xCBF29CE484222325, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(width):
            step = (h ^ points[:, i].astype(np.uint64)) * np.uint64(0x100000001B3)
            h = np.where(i < lengths, step, h)
    ids = 1 + hash_ids(h.view(np.int64), rows - 1)
    return np.where(lengths == 0, 0, ids)


@dataclasses.dataclass
class RawBags:
    """One column of a raw chunk: flat tokens, per-sample bag lengths, optional values."""

    tokens: list[str] | list[int] | np.ndarray = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    weights: list[float] | None = None


@dataclasses.dataclass
class RawChunk:
    """Parsed but not yet encoded rows of one chunk."""

    labels: list[float]
    dense: list[float]  # row-major [n, num_dense]
    bags: list[RawBags]  # one per sparse column
    lines: list[int]  # the 0-based data-row index of each row within its chunk


@dataclasses.dataclass(frozen=True, kw_only=True)
class ColumnOptions:
    """How a reader's sparse columns are encoded; None means chosen from the data."""

    encoding: Encoding | None = None  # None: the format's default (hash for Criteo, else vocab)
    rows: int | Sequence[int] | None = None  # table size(s), row 0 included
    max_rows: int = 1 << 20  # cap on a table size chosen from the data
    min_count: int = 1  # vocab: tokens seen fewer times map to row 0
    max_ids: int | None = None  # bag width; from the data unless given
    sequence: tuple[str, ...] = ()  # columns read as histories (unpooled)

    def __post_init__(self):
        if self.encoding is not None:
            object.__setattr__(self, "encoding", Encoding(self.encoding))
        sizes = [self.rows] if self.rows is None or isinstance(self.rows, int) else list(self.rows)
        if any(r is not None and r < 2 for r in sizes):
            raise ValueError(f"table rows must be >= 2 (row 0 is reserved), got {self.rows}")
        for name in ("max_rows", "min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_ids is not None and self.max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {self.max_ids}")


class SchemaBuilder:
    """Collects token statistics over the training rows, then fixes the schema."""

    def __init__(self, dense: Sequence[str], sparse: Sequence[str], options: ColumnOptions, transform):
        self.dense, self.sparse, self.options, self.transform = (
            tuple(dense),
            tuple(sparse),
            options,
            transform,
        )
        self.dense_stats = DenseStats(len(self.dense))
        self.counts = [Counter() for _ in sparse]
        self.max_len = [0] * len(sparse)
        self.weighted = [False] * len(sparse)
        self.given_rows = options.rows

    def observe(self, raw: RawChunk, keep: np.ndarray | None = None) -> None:
        """Adds a chunk's rows (those where `keep` is True) to the statistics."""
        if self.transform is DenseTransform.AUTO and self.dense:
            dense = np.asarray(raw.dense, np.float32).reshape(len(raw.labels), len(self.dense))
            self.dense_stats.observe(dense if keep is None else dense[keep])
        while len(raw.bags) > len(self.counts):  # positional libFM: a field not seen before
            self.counts.append(Counter())
            self.max_len.append(0)
            self.weighted.append(False)
        for i, bags in enumerate(raw.bags):
            lengths = np.asarray(bags.lengths, np.int64)
            if keep is not None and not keep.all():
                flat_keep = np.repeat(keep, lengths)
                tokens = np.asarray(bags.tokens)[flat_keep]  # keeps int tokens ints
                lengths = lengths[keep]
                weights = None if bags.weights is None else np.asarray(bags.weights)[flat_keep]
            else:
                tokens, weights = bags.tokens, bags.weights
            if isinstance(tokens, np.ndarray):
                tokens = tokens.tolist()
            if len(lengths):
                self.max_len[i] = max(self.max_len[i], int(lengths.max()))
            if weights is not None and len(weights) and (np.asarray(weights) != 1).any():
                self.weighted[i] = True
            needs_counts = self.options.encoding is Encoding.VOCAB or self.given_rows is None
            if needs_counts and len(self.counts[i]) <= 4 * self.options.max_rows:
                self.counts[i].update(tokens)

    def build(self) -> DataSchema:
        names = self.sparse + tuple(f"field{k}" for k in range(len(self.sparse), len(self.counts)))
        unknown = sorted(set(self.options.sequence) - set(names))
        if unknown:
            raise ValueError(f"sequence columns {unknown} are not sparse columns of the data {list(names)}")
        rows = self.given_rows
        rows = [rows] * len(names) if rows is None or isinstance(rows, int) else list(rows)
        if len(rows) != len(names):
            raise ValueError(f"{len(rows)} table sizes given for {len(names)} sparse columns {list(names)}")
        columns = []
        for i, name in enumerate(names):
            max_ids = self.options.max_ids or max(1, self.max_len[i])
            counts = self.counts[i]
            counts.pop(MISSING, None)
            counts.pop(MISSING_INT, None)
            if self.options.encoding is Encoding.VOCAB:
                kept = [t for t, n in counts.items() if n >= self.options.min_count]
                kept.sort(key=lambda t: (-counts[t], t))  # hot tokens first, ties by token
                limit = (rows[i] or self.options.max_rows) - 1
                vocab = tuple(kept[:limit])
                columns.append(
                    SparseColumn(
                        name=name,
                        encoding=Encoding.VOCAB,
                        rows=rows[i] or max(2, len(vocab) + 1),
                        max_ids=max_ids,
                        vocab=vocab,
                        weighted=self.weighted[i],
                        sequence=name in self.options.sequence,
                    )
                )
            else:
                # Hashing into twice the distinct count keeps collisions to about a quarter.
                size = rows[i] or min(self.options.max_rows, max(16, 1 + 2 * len(counts)))
                columns.append(
                    SparseColumn(
                        name=name,
                        encoding=Encoding.HASH,
                        rows=size,
                        max_ids=max_ids,
                        weighted=self.weighted[i],
                        sequence=name in self.options.sequence,
                    )
                )
        scales = self.dense_stats.scales() if self.transform is DenseTransform.AUTO else None
        return DataSchema(
            dense=self.dense, sparse=tuple(columns), dense_transform=self.transform, dense_scales=scales
        )
