"""Criteo in MLPerf DLRM-DCNv2's multi-hot form, materialized into memory-mapped arrays.

MLPerf's benchmark turns Criteo 1TB's one id per categorical feature into a fixed-size
bag: feature t keeps its id and adds `multi_hot_sizes[t] - 1` ids drawn uniformly from
its table, the same ids every time the same id appears. `materialize_multihot` streams
Criteo TSV files once, hashes each categorical value into its table (row caps: 40M in
MLPerf), expands it so, and writes the binary directory `criteo:DIR` reads: `labels.npy`
[n] uint8, `dense.npy` [n, 13] float32 (Criteo's log transform applied), `sparse.npy`
[n, sum of the sizes] int32 (each feature's bag side by side), `schema.json` and
`meta.json` (last: it marks the set complete).

The extra ids come from a hash of (seed, feature, id, position), so no table-sized
lookup table is kept: the same construction as MLPerf's reference, not its bytes (which
come from NumPy's generator over a lookup table per feature).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from recsys.data.dataset import BinaryWriter, ReadOptions, format_reader
from recsys.data.examples import DataError, ReadReport
from recsys.data.formats import CRITEO_DENSE, CRITEO_SPARSE
from recsys.data.readers import resolve_paths
from recsys.data.schema import DataSchema, DenseTransform, Encoding, SparseColumn
from recsys.sparse import hash_ids
from recsys.specs import Pooling


def multihot_schema(rows: Sequence[int], multi_hot_sizes: Sequence[int]) -> DataSchema:
    """Criteo's columns hashed into `rows`, each bag `multi_hot_sizes` wide and sum-pooled."""
    if len(rows) != len(CRITEO_SPARSE) or len(multi_hot_sizes) != len(CRITEO_SPARSE):
        raise ValueError(
            f"Criteo has {len(CRITEO_SPARSE)} categorical features: got {len(rows)} row caps "
            f"and {len(multi_hot_sizes)} multi-hot sizes"
        )
    columns = tuple(
        SparseColumn(name=name, encoding=Encoding.HASH, rows=r, max_ids=k, pooling=Pooling.SUM)
        for name, r, k in zip(CRITEO_SPARSE, rows, multi_hot_sizes)
    )
    return DataSchema(dense=CRITEO_DENSE, sparse=columns, dense_transform=DenseTransform.LOG)


def expand(ids: np.ndarray, feature: int, size: int, rows: int, seed: int = 0) -> np.ndarray:
    """[n, size] bags of one feature's one-hot `ids` [n]: the id, then `size - 1` ids in
    [0, rows) that depend only on (seed, feature, id, position)."""
    ids = np.asarray(ids, np.int64)
    if size == 1:
        return ids[:, None]
    position = np.arange(1, size, dtype=np.int64)[None, :]
    with np.errstate(over="ignore"):
        key = (ids[:, None] * np.int64(0x9E3779B1)) ^ (position << np.int64(40)) ^ np.int64(feature << 52)
        key = key ^ np.int64(seed)
    return np.concatenate([ids[:, None], hash_ids(key, rows)], axis=1)


def materialize_multihot(
    spec: str,
    out_dir: str,
    *,
    rows: Sequence[int],
    multi_hot_sizes: Sequence[int],
    seed: int = 0,
    progress: Callable[[str], None] = print,
) -> DataSchema:
    """Writes the multi-hot binary form of the Criteo TSV files `spec` into `out_dir`."""
    paths = resolve_paths(spec)
    schema = multihot_schema(rows, multi_hot_sizes)
    one_hot = DataSchema(
        dense=schema.dense,
        sparse=tuple(
            SparseColumn(name=c.name, encoding=Encoding.HASH, rows=c.rows, max_ids=1) for c in schema.sparse
        ),
        dense_transform=DenseTransform.LOG,
    )
    reader = format_reader("criteo", paths, ReadOptions())
    total = reader.num_rows
    if total == 0:
        raise DataError("no data rows", path=",".join(paths))
    out = BinaryWriter(out_dir, total, int(sum(multi_hot_sizes)))
    report = ReadReport()
    for n, chunk in enumerate(reader.chunks):
        examples = one_hot.encode(reader.read_raw(chunk, report))
        bags = [
            expand(examples.sparse[c.name].values, t, c.max_ids, c.rows, seed)
            for t, c in enumerate(schema.sparse)
        ]
        out.write(examples, np.concatenate(bags, axis=1))
        progress(f"materialized chunk {n + 1}/{len(reader.chunks)} ({out.row}/{total} rows)")
    sizes = [int(k) for k in multi_hot_sizes]
    out.finish(
        schema, {"sources": [os.path.abspath(p) for p in paths], "multi_hot_sizes": sizes, "seed": seed}
    )
    return schema
