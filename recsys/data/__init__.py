"""Reading training data: Criteo TSV (and its preprocessed binary form), libFM, CSV and
Parquet, streamed chunk by chunk into shuffled, resumable, prefetched batches."""

from recsys.data.dataset import (
    Dataset,
    OpenedData,
    ReadOptions,
    open_data,
    open_eval,
    parse_spec,
    preprocess_criteo,
)
from recsys.data.examples import DataError, Examples, OnError, ReadReport
from recsys.data.pipeline import Position, Prefetcher, eval_batches, steps_per_epoch, train_batches
from recsys.data.schema import ColumnOptions, DataSchema, DenseTransform, Encoding, SparseColumn

__all__ = [
    "ColumnOptions",
    "DataError",
    "DataSchema",
    "Dataset",
    "DenseTransform",
    "Encoding",
    "Examples",
    "OnError",
    "OpenedData",
    "open_eval",
    "Position",
    "Prefetcher",
    "ReadOptions",
    "ReadReport",
    "SparseColumn",
    "eval_batches",
    "open_data",
    "parse_spec",
    "preprocess_criteo",
    "steps_per_epoch",
    "train_batches",
]
