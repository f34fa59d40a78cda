"""Datasets: the chunks of one split (train or eval) and the schema that encodes them.

`open_data("criteo:PATH" | "libfm:PATH" | "csv:PATH" | "parquet:PATH", ...)` indexes the
files, parses the training rows once to build the schema (vocabularies, table sizes,
bag widths) and to count what each chunk holds, and returns `Dataset`s whose chunks are
read (and encoded) on demand. Without separate evaluation data the last `holdout`
fraction of the rows is held out; with `validation`, the last fraction of the training
rows becomes a validation split. The schema only ever sees training rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

import numpy as np

from recsys.data.examples import DataError, Examples, OnError, ReadReport
from recsys.data.formats import CriteoFormat, CSVFormat, LibFMFormat, TabularColumns, read_field_map
from recsys.data.readers import ParquetReader, TextReader, iter_raw, resolve_paths, rows_in_range
from recsys.data.schema import ColumnOptions, DataSchema, DenseTransform, Encoding, SchemaBuilder
from recsys.sparse import RaggedIds

KINDS = ("synthetic", "criteo", "libfm", "csv", "parquet")


class Dataset:
    """Examples in chunks; `chunk(i)` reads, encodes (and, if caching, keeps) chunk i.

    Attributes:
      sizes: examples in each chunk (malformed rows skipped under OnError.SKIP excluded).
      fingerprint: identifies the files, row range and encoding, for resume checks.
    """

    def __init__(self, read: Callable[[int], Examples], sizes: list[int], *, fingerprint: str, cache: bool):
        self._read, self.sizes, self.fingerprint = read, list(sizes), fingerprint
        self._cache: dict[int, Examples] | None = {} if cache else None

    def __len__(self) -> int:
        return sum(self.sizes)

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)

    def chunk(self, i: int) -> Examples:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        examples = self._read(i)
        if len(examples) != self.sizes[i]:
            raise DataError(f"chunk {i} now holds {len(examples)} examples, {self.sizes[i]} when indexed")
        if self._cache is not None:
            self._cache[i] = examples
        return examples

    @classmethod
    def in_memory(cls, examples: Examples, chunk_rows: int = 65536, name: str = "memory") -> Dataset:
        starts = list(range(0, len(examples), chunk_rows))
        sizes = [min(chunk_rows, len(examples) - s) for s in starts]
        return cls(
            lambda i: examples.slice(starts[i], starts[i] + chunk_rows),
            sizes,
            fingerprint=f"{name}:{len(examples)}",
            cache=False,
        )


@dataclasses.dataclass
class OpenedData:
    schema: DataSchema
    train: Dataset
    eval: Dataset
    train_report: ReadReport
    eval_report: ReadReport
    validation: Dataset | None = None  # the training rows' last `ReadOptions.validation` fraction


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How `open_data` reads files; the CLI's data flags map onto these one to one."""

    label: str = "label"  # csv/parquet label column
    dense: tuple[str, ...] = ()  # csv/parquet dense columns
    sparse: tuple[str, ...] | None = None  # csv/parquet sparse columns; None: all others
    ignore: tuple[str, ...] = ()  # csv/parquet columns to leave out of the default sparse set
    multi_hot_sep: str | None = None  # split sparse fields into bags on this separator
    delimiter: str | None = None  # csv field delimiter; default ',' ('\t' for .tsv)
    libfm_fields: str | None = None  # libFM field-map file ("index field" lines); default positional
    columns: ColumnOptions | None = None  # encoding, table sizes, bag widths; per-format default
    # Default: log for criteo, none for libfm, auto (log or standardize, per column) for csv/parquet.
    dense_transform: DenseTransform | None = None
    on_error: OnError = OnError.RAISE
    holdout: float = 0.2  # held-out fraction when no eval data is given
    validation: float = 0.0  # the training rows' last fraction kept apart for validation (0: none)
    chunk_rows: int = 65536
    cache_bytes: int = 256 << 20  # keep parsed chunks in memory when the files are this small


def parse_spec(spec: str) -> tuple[str, str]:
    """'criteo:/data/day_*.tsv' -> ('criteo', '/data/day_*.tsv')."""
    kind, sep, path = spec.partition(":")
    if spec == "synthetic":
        return "synthetic", ""
    if not sep or kind not in KINDS[1:] or not path:
        raise ValueError(f"data {spec!r}: expected synthetic or KIND:PATH with KIND one of {list(KINDS[1:])}")
    return kind, path


def format_reader(kind: str, paths: list[str], options: ReadOptions, fmt=None):
    """The reader of `kind` files (criteo, libfm, csv, parquet) at `paths`; `fmt`: a text
    format to reuse (evaluation files read like the training files)."""
    if kind == "parquet":
        columns = TabularColumns(
            options.label, options.dense, options.sparse, options.ignore, options.multi_hot_sep
        )
        return ParquetReader(paths, columns, on_error=options.on_error)
    if fmt is None:
        if kind == "criteo":
            fmt = CriteoFormat()
        elif kind == "libfm":
            fmt = LibFMFormat(read_field_map(options.libfm_fields) if options.libfm_fields else None)
        else:
            delimiter = options.delimiter or ("\t" if paths[0].endswith((".tsv", ".tsv.txt")) else ",")
            columns = TabularColumns(
                options.label, options.dense, options.sparse, options.ignore, options.multi_hot_sep
            )
            fmt = CSVFormat(columns, delimiter)
    return TextReader(paths, fmt, on_error=options.on_error, chunk_rows=options.chunk_rows)


def _defaults(kind: str, options: ReadOptions) -> tuple[ColumnOptions, DenseTransform]:
    columns = options.columns or ColumnOptions()
    if columns.encoding is None:
        columns = dataclasses.replace(columns, encoding=Encoding.HASH if kind == "criteo" else Encoding.VOCAB)
    default = {"libfm": DenseTransform.NONE, "criteo": DenseTransform.LOG}.get(kind, DenseTransform.AUTO)
    transform = options.dense_transform or default
    return columns, DenseTransform(transform)


def _fingerprint(paths: list[str], start: int, stop: int, schema: DataSchema) -> str:
    files = [(os.path.abspath(p), os.path.getsize(p)) for p in paths]
    return json.dumps({"files": files, "rows": [start, stop], "schema": schema.fingerprint()})


def _split(reader, schema: DataSchema, paths, start, stop, sizes, chunk_ids, options: ReadOptions) -> Dataset:
    refs = [reader.chunks[i] for i in chunk_ids]

    def read(i: int) -> Examples:
        raw = reader.read_raw(refs[i])
        examples = schema.encode(raw)
        keep = rows_in_range(raw, refs[i], start, stop)
        return examples if keep.all() else examples.take(np.flatnonzero(keep))

    small = sum(os.path.getsize(p) for p in paths) <= options.cache_bytes
    return Dataset(read, sizes, fingerprint=_fingerprint(paths, start, stop, schema), cache=small)


def _validation_start(rows: int, options: ReadOptions) -> int:
    """Where the validation split starts in `rows` training rows (`rows` without one)."""
    if options.validation == 0:
        return rows
    if not 0 < options.validation < 1:
        raise ValueError(f"validation must be a fraction in (0, 1), got {options.validation}")
    start = int(round(rows * (1 - options.validation)))
    if not 0 < start < rows:
        raise DataError(
            f"{rows} training rows are too few to hold out a validation fraction of {options.validation}"
        )
    return start


def _count(reader, start, stop, report, observe=None) -> tuple[list[int], list[int]]:
    """(examples per chunk, chunk indices) over global rows [start, stop); `observe(raw,
    keep)` also sees every chunk (the schema builder's statistics pass)."""
    sizes, ids = [], []
    for i, raw, keep in iter_raw(reader, start, stop, report):
        if observe is not None:
            observe(raw, keep)
        ids.append(i)
        sizes.append(int(keep.sum()))
    return sizes, ids


def open_data(
    spec: str, eval_spec: str | None = None, options: ReadOptions = ReadOptions(), schema=None
) -> OpenedData:
    """Opens training data (and evaluation data, or a held-out tail of the training data).

    Args:
      spec: KIND:PATH, PATH a file, a glob or a comma-separated list; a Criteo PATH may
        also be a directory written by `preprocess_criteo`.
      eval_spec: the same for evaluation data, read with the training schema.
      options: how to read; see ReadOptions.
      schema: a schema to use instead of building one (a resumed run passes the saved one).
    """
    kind, path = parse_spec(spec)
    if kind == "criteo" and os.path.isdir(path):
        return _open_criteo_binary(path, eval_spec, options)
    paths = resolve_paths(path)
    columns, transform = _defaults(kind, options)
    reader = format_reader(kind, paths, options)
    train_report, eval_report = ReadReport(), ReadReport()
    total = reader.num_rows
    if total == 0:
        raise DataError("no data rows", path=",".join(paths))
    if eval_spec is None:
        if not 0 < options.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1) without eval data, got {options.holdout}")
        train_stop = int(round(total * (1 - options.holdout)))
    else:
        train_stop = total
    validation_start = _validation_start(train_stop, options)

    counted = None
    if schema is None:
        builder = SchemaBuilder(reader.fmt.dense_names, reader.fmt.sparse_names, columns, transform)
        counted = _count(reader, 0, validation_start, train_report, observe=builder.observe)
        schema = builder.build()
    if isinstance(reader.fmt, LibFMFormat) and reader.fmt.field_of is None:
        reader.fmt.set_num_fields(len(schema.sparse))  # positional: as many fields as training had
    sizes, ids = counted or _count(reader, 0, validation_start, train_report)
    train = _split(reader, schema, paths, 0, validation_start, sizes, ids, options)
    if len(train) == 0:
        raise DataError("no valid training rows", path=",".join(paths))
    validation = None
    if validation_start < train_stop:
        validation = _rows(
            reader, schema, paths, validation_start, train_stop, train_report, options, "validation"
        )

    if eval_spec is None:
        evaluation = _rows(reader, schema, paths, train_stop, total, eval_report, options, "evaluation")
    else:
        eval_kind = parse_spec(eval_spec)[0]
        if eval_kind != kind:
            raise ValueError(f"eval data is {eval_kind}, training data {kind}: both must be one format")
        # Text formats read the evaluation files as they read the training files.
        fmt = None if kind == "parquet" else reader.fmt
        evaluation, eval_report = open_eval(eval_spec, schema, options, fmt=fmt)
    return OpenedData(schema, train, evaluation, train_report, eval_report, validation)


def _rows(reader, schema, paths, start, stop, report, options: ReadOptions, what: str) -> Dataset:
    """Rows [start, stop) of `reader` as a `Dataset`; an error naming `what` data when none
    of them is valid."""
    sizes, ids = _count(reader, start, stop, report)
    data = _split(reader, schema, paths, start, stop, sizes, ids, options)
    if len(data) == 0:
        raise DataError(f"no valid {what} rows", path=",".join(paths))
    return data


# -- Criteo's preprocessed binary form ------------------------------------------------


def preprocess_criteo(
    spec: str, out_dir: str, options: ReadOptions = ReadOptions(), progress: Callable[[str], None] = print
) -> DataSchema:
    """Parses Criteo TSV files once into NumPy arrays for fast repeated epochs.

    Writes `labels.npy` [n] uint8, `dense.npy` [n, 13] float32 (already transformed),
    `sparse.npy` [n, 26] int32 (already hashed to the table sizes), `schema.json` and
    `meta.json` (the source files, row count and what was skipped). The schema sees all
    rows, so a held-out tail at training time shares its table sizes.
    """
    paths = resolve_paths(spec)
    columns, transform = _defaults("criteo", options)
    reader = format_reader("criteo", paths, options)
    report = ReadReport()
    builder = SchemaBuilder(reader.fmt.dense_names, reader.fmt.sparse_names, columns, transform)
    total = sum(_count(reader, 0, reader.num_rows, report, observe=builder.observe)[0])
    schema = builder.build()
    if any(c.max_ids != 1 for c in schema.sparse):
        raise AssertionError("Criteo columns are single-valued")
    out = BinaryWriter(out_dir, total, len(schema.sparse))
    for n, chunk in enumerate(reader.chunks):
        examples = schema.encode(reader.read_raw(chunk))
        out.write(examples, np.stack([examples.sparse[c.name].values for c in schema.sparse], axis=1))
        progress(f"preprocessed chunk {n + 1}/{len(reader.chunks)} ({out.row} rows)")
    out.finish(schema, {"sources": [os.path.abspath(p) for p in paths], "skipped": report.skipped})
    return schema


class BinaryWriter:
    """Writes the binary directory `criteo:DIR` reads: `labels.npy` [n] uint8, `dense.npy`
    [n, 13] float32, `sparse.npy` [n, ids per row] int32, `schema.json`, `meta.json`. The
    arrays fill memory-mapped files in `DIR/.partial`; files appear in DIR only once
    complete, meta.json last, which marks the whole set done."""

    def __init__(self, out_dir: str, rows: int, ids_per_row: int):
        self.out_dir, self.tmp, self.row = out_dir, os.path.join(out_dir, ".partial"), 0
        os.makedirs(self.tmp, exist_ok=True)
        self.labels = self._array("labels.npy", np.uint8, (rows,))
        self.dense = self._array("dense.npy", np.float32, (rows, 13))
        self.sparse = self._array("sparse.npy", np.int32, (rows, ids_per_row))

    def _array(self, name: str, dtype, shape):
        return np.lib.format.open_memmap(os.path.join(self.tmp, name), "w+", dtype, shape)

    def write(self, examples: Examples, sparse: np.ndarray) -> None:
        """Appends `examples`' labels and dense features and their ids `sparse` [n, ids per row]."""
        end = self.row + len(examples)
        self.labels[self.row : end] = examples.labels
        self.dense[self.row : end] = examples.dense
        self.sparse[self.row : end] = sparse
        self.row = end

    def finish(self, schema: DataSchema, meta: dict) -> None:
        for array in (self.labels, self.dense, self.sparse):
            array.flush()
        del self.labels, self.dense, self.sparse
        with open(os.path.join(self.tmp, "schema.json"), "w") as f:
            json.dump(schema.to_json(), f)
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump({"rows": self.row, **meta}, f, indent=2)
        for name in ("labels.npy", "dense.npy", "sparse.npy", "schema.json", "meta.json"):
            os.replace(os.path.join(self.tmp, name), os.path.join(self.out_dir, name))
        os.rmdir(self.tmp)


class _CriteoBinary:
    """A directory `preprocess_criteo` or `recsys.data.multihot` wrote: its schema, row
    count, and `split(start, stop)`, a `Dataset` of rows [start, stop)."""

    def __init__(self, path: str, options: ReadOptions):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{path} is not a preprocessed Criteo directory (no meta.json)")
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(path, "schema.json")) as f:
            self.schema = DataSchema.from_json(json.load(f))
        self.path, self.options, self.total = path, options, meta["rows"]
        self.labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
        self.dense = np.load(os.path.join(path, "dense.npy"), mmap_mode="r")
        self.sparse = np.load(os.path.join(path, "sparse.npy"), mmap_mode="r")
        if not len(self.labels) == len(self.dense) == len(self.sparse) == self.total:
            raise DataError(
                f"arrays hold {len(self.labels)}/{len(self.dense)}/{len(self.sparse)} rows, "
                f"meta.json says {self.total}",
                path=path,
            )
        # Each feature's bag width: MLPerf's multi-hot form (`recsys.data.multihot`) or one id.
        widths = meta.get("multi_hot_sizes", [1] * len(self.schema.sparse))
        self.bounds = np.concatenate([[0], np.cumsum(widths)]).astype(int)
        if self.sparse.shape[1] != self.bounds[-1] or [c.max_ids for c in self.schema.sparse] != list(widths):
            raise DataError(
                f"sparse.npy holds {self.sparse.shape[1]} ids per row and schema.json bags of "
                f"{[c.max_ids for c in self.schema.sparse]}; meta.json says {list(widths)}",
                path=path,
            )

    def split(self, start: int, stop: int) -> Dataset:
        rows = self.options.chunk_rows
        starts = list(range(start, stop, rows))
        names = [c.name for c in self.schema.sparse]
        bounds = self.bounds

        def read(i: int) -> Examples:
            lo, hi = starts[i], min(starts[i] + rows, stop)
            ids = np.asarray(self.sparse[lo:hi], np.int64)
            bags = {
                name: RaggedIds(ids[:, a:b].reshape(-1), np.full(hi - lo, b - a, np.int64))
                for name, a, b in zip(names, bounds[:-1], bounds[1:])
            }
            return Examples(np.asarray(self.dense[lo:hi]), bags, np.asarray(self.labels[lo:hi], np.float32))

        sizes = [min(rows, stop - s) for s in starts]
        where = {"criteo_binary": os.path.abspath(self.path), "rows": [start, stop], "n": self.total}
        return Dataset(read, sizes, fingerprint=json.dumps(where), cache=False)


def open_eval(
    spec: str, schema: DataSchema, options: ReadOptions = ReadOptions(), *, fmt=None, what: str = "evaluation"
) -> tuple[Dataset, ReadReport]:
    """Evaluation-only data (all its rows), encoded with a training run's `schema`: TSV,
    libFM, CSV or Parquet files, or a preprocessed Criteo directory written with the same
    schema. `fmt`: the training reader's text format, to read these files alike; `what`:
    the data's role in errors."""
    kind, path = parse_spec(spec)
    if kind == "criteo" and os.path.isdir(path):
        binary = _CriteoBinary(path, options)
        if binary.schema.fingerprint() != schema.fingerprint():
            raise DataError(
                "was preprocessed with another schema (table sizes, bags) than the training data", path=path
            )
        return binary.split(0, binary.total), ReadReport()
    paths = resolve_paths(path)
    reader = format_reader(kind, paths, options, fmt=fmt)
    if isinstance(reader.fmt, LibFMFormat) and reader.fmt.field_of is None:
        reader.fmt.set_num_fields(len(schema.sparse))  # positional: as many fields as training had
    report = ReadReport()
    return _rows(reader, schema, paths, 0, reader.num_rows, report, options, what), report


def _open_criteo_binary(path: str, eval_spec: str | None, options: ReadOptions) -> OpenedData:
    binary = _CriteoBinary(path, options)
    schema, total = binary.schema, binary.total
    train_stop = int(round(total * (1 - options.holdout))) if eval_spec is None else total
    validation_start = _validation_start(train_stop, options)
    train = binary.split(0, validation_start)
    validation = binary.split(validation_start, train_stop) if validation_start < train_stop else None
    if eval_spec is None:
        return OpenedData(
            schema, train, binary.split(train_stop, total), ReadReport(), ReadReport(), validation
        )
    if parse_spec(eval_spec)[0] != "criteo":
        raise ValueError(
            f"eval data is {parse_spec(eval_spec)[0]}, training data criteo: both must be one format"
        )
    evaluation, report = open_eval(eval_spec, schema, options)
    return OpenedData(schema, train, evaluation, ReadReport(), report, validation)
