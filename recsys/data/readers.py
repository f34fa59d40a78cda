"""Streaming readers: text files (by line format) and Parquet, read chunk by chunk.

A reader first indexes its files into chunks of at most `chunk_rows` data rows that
never cross a file boundary (text: one fast pass over the bytes recording where every
chunk starts; Parquet: its row groups). Any chunk can then be re-read on its own, which
is what lets training shuffle chunk order per epoch and resume at an exact position
without re-reading what came before. Only one chunk is in memory at a time.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterator

import numpy as np

from recsys.data.examples import DataError, OnError, ReadReport
from recsys.data.formats import LineError, Parsed, TabularColumns
from recsys.data.schema import RawBags, RawChunk


def resolve_paths(spec: str) -> list[str]:
    """A comma-separated list of paths or globs -> the files, each glob sorted."""
    paths = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise FileNotFoundError(f"no file matches {part!r}")
        for path in matches:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path!r}")
        paths.extend(matches)
    if not paths:
        raise FileNotFoundError(f"no files given in {spec!r}")
    return paths


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    """Where a chunk lives and which global data rows it covers."""

    file: int  # index into the reader's paths
    offset: int  # byte offset of its first line (text) or row group index (Parquet)
    first_line: int  # 1-based line (text) or 0-based row (Parquet) of its first row, for messages
    first_row: int  # global index of its first data row over all files
    rows: int  # data rows in the chunk, malformed ones included


class ChunkBuilder:
    """Accumulates parsed rows into a RawChunk; columns grow for positional libFM."""

    def __init__(self, num_dense: int, num_sparse: int):
        self.num_dense = num_dense
        self.labels, self.dense, self.lines = [], [], []
        self.bags = [RawBags() for _ in range(num_sparse)]

    def add(self, row: int, parsed: Parsed) -> None:
        label, dense, bags = parsed
        if len(dense) != self.num_dense:
            raise AssertionError("format returned the wrong number of dense values")
        while len(bags) > len(self.bags):  # a new positional field: earlier rows had none
            self.bags.append(RawBags(lengths=[0] * len(self.labels)))
        for column, bag in zip(self.bags, bags):
            tokens, values = bag
            column.tokens.extend(tokens)
            column.lengths.append(len(tokens))
            if values is not None:
                if column.weights is None:
                    column.weights = [1.0] * (len(column.tokens) - len(tokens))
                column.weights.extend(values)
            elif column.weights is not None:
                column.weights.extend([1.0] * len(tokens))
        for column in self.bags[len(bags) :]:
            column.lengths.append(0)
        self.labels.append(label)
        self.dense.extend(dense)
        self.lines.append(row)

    def finish(self) -> RawChunk:
        return RawChunk(labels=self.labels, dense=self.dense, bags=self.bags, lines=self.lines)


class TextReader:
    """Line-oriented files (Criteo TSV, libFM, CSV) in a given `fmt`."""

    def __init__(self, paths: list[str], fmt, *, on_error=OnError.RAISE, chunk_rows: int = 65536):
        self.paths, self.fmt, self.on_error, self.chunk_rows = paths, fmt, OnError(on_error), chunk_rows
        self.chunks = self._index()

    def _index(self) -> list[ChunkRef]:
        chunks, global_row = [], 0
        for file, path in enumerate(self.paths):
            with open(path, "rb") as f:
                offset, line_no = 0, 1
                if self.fmt.header:
                    header = f.readline()
                    if not header:
                        raise DataError("empty file, expected a header line", path=path)
                    self.fmt.bind_header(_decode(header, path, 1), path)
                    offset, line_no = len(header), 2
                start, start_line, rows = offset, line_no, 0
                for line in f:
                    if rows == self.chunk_rows:
                        chunks.append(ChunkRef(file, start, start_line, global_row, rows))
                        global_row += rows
                        start, start_line, rows = offset, line_no, 0
                    offset += len(line)
                    line_no += 1
                    rows += 1
                if rows:
                    chunks.append(ChunkRef(file, start, start_line, global_row, rows))
                    global_row += rows
        return chunks

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    def read_raw(self, chunk: ChunkRef, report: ReadReport | None = None) -> RawChunk:
        path = self.paths[chunk.file]
        with open(path, "rb") as f:
            f.seek(chunk.offset)
            raw_lines = [f.readline() for _ in range(chunk.rows)]
        if raw_lines and not raw_lines[-1]:
            short = chunk.first_line + raw_lines.index(b"")
            raise DataError("the file is shorter than when it was indexed", path=path, line=short)
        fast = getattr(self.fmt, "parse_block", None)
        if fast is not None:
            parsed = fast(b"".join(raw_lines))
            if parsed is not None:
                return parsed
        # Line by line: slower, but it can name the file and line of what is wrong.
        builder = ChunkBuilder(len(self.fmt.dense_names), len(self.fmt.sparse_names))
        for row, raw in enumerate(raw_lines):
            line_no = chunk.first_line + row
            line = _decode(raw, path, line_no)
            if not line.strip():
                continue
            try:
                builder.add(row, self.fmt.parse(line))
            except LineError as e:
                error = DataError(e.message, path=path, line=line_no, column=e.column)
                if self.on_error is OnError.RAISE:
                    raise error from None
                if report is not None:
                    report.record(error)
        return builder.finish()


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path, line=line) from None


class ParquetReader:
    """Parquet files with named label, dense and sparse columns; a chunk is a row group.

    A sparse column may be a list column (a bag per row) or a string/integer column,
    split on the multi-hot separator when one is given.
    """

    def __init__(self, paths: list[str], columns: TabularColumns, *, on_error=OnError.RAISE):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install 'recsys-4d[parquet]'") from None
        self.pq, self.paths, self.columns, self.on_error = pq, paths, columns, OnError(on_error)
        self.chunks, global_row = [], 0
        for file, path in enumerate(paths):
            parquet = pq.ParquetFile(path)
            meta = parquet.metadata
            columns.bind(parquet.schema_arrow.names, path)
            first = 0
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                self.chunks.append(ChunkRef(file, group, first, global_row, rows))
                first += rows
                global_row += rows
        self.fmt = columns

    @property
    def num_rows(self) -> int:
        return sum(c.rows for c in self.chunks)

    def read_raw(self, chunk: ChunkRef, report: ReadReport | None = None) -> RawChunk:
        path = self.paths[chunk.file]
        cols = self.columns
        names = [cols.label, *cols.dense_names, *cols.sparse_names]
        table = self.pq.ParquetFile(path).read_row_group(chunk.offset, columns=names)
        values = [table.column(n).to_pylist() for n in names]
        builder = ChunkBuilder(len(cols.dense_names), len(cols.sparse_names))
        for row, record in enumerate(zip(*values)):
            try:
                builder.add(row, cols.parse_ordered(record))
            except LineError as e:
                error = DataError(e.message, path=path, line=f"row {chunk.first_line + row}", column=e.column)
                if self.on_error is OnError.RAISE:
                    raise error from None
                if report is not None:
                    report.record(error)
        return builder.finish()


def rows_in_range(raw: RawChunk, chunk: ChunkRef, start: int, stop: int) -> np.ndarray:
    """[n] bool: which parsed rows of `raw` have a global row index in [start, stop)."""
    rows = chunk.first_row + np.asarray(raw.lines, np.int64)
    return (rows >= start) & (rows < stop)


def iter_raw(
    reader, start: int, stop: int, report: ReadReport | None
) -> Iterator[tuple[int, RawChunk, np.ndarray]]:
    """(chunk index, raw chunk, keep mask) for every chunk overlapping global rows [start, stop)."""
    for i, chunk in enumerate(reader.chunks):
        if chunk.first_row + chunk.rows <= start or chunk.first_row >= stop:
            continue
        raw = reader.read_raw(chunk, report)
        yield i, raw, rows_in_range(raw, chunk, start, stop)
