"""Line formats: Criteo TSV, libFM and delimited text with named columns.

A format turns one line into `(label, dense values, bags)` where each bag is
`(tokens, values or None)`, or raises `LineError` saying what is wrong and in which
column; the reader adds the file and line. Blank lines are not data and are ignored.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence

from recsys.data.schema import MISSING

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))


class LineError(ValueError):
    def __init__(self, message: str, column=None):
        super().__init__(message)
        self.message, self.column = message, column


Parsed = tuple[float, list[float], list[tuple[list[str], list[float] | None]]]


def parse_label(text, column="label") -> float:
    """0/1 labels; also -1/+1 (libFM), 0.0/1.0 and true/false."""
    value = str(text).strip().lower()
    if value in ("1", "+1", "1.0", "true"):
        return 1.0
    if value in ("0", "-1", "0.0", "-1.0", "false"):
        return 0.0
    raise LineError(f"label {text!r} is not one of 0/1, -1/+1", column)


def parse_dense(text, column) -> float:
    """A finite number; an empty field is a missing value and reads as 0."""
    if text is None or text == "":
        return 0.0
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LineError(f"dense value {text!r} is not a number", column) from None
    if not math.isfinite(value):
        raise LineError(f"dense value {text!r} is not finite", column)
    return value


class CriteoFormat:
    """label, I1..I13 (integers, may be empty or negative), C1..C26 (hex, may be empty)."""

    header = False
    dense_names = CRITEO_DENSE
    sparse_names = CRITEO_SPARSE

    def parse(self, line: str) -> Parsed:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) != 40:
            raise LineError(
                f"expected 40 tab-separated fields (label, 13 integer, 26 categorical), got {len(fields)}"
            )
        if fields[0] not in ("0", "1"):
            raise LineError(f"label {fields[0]!r} is not 0 or 1", "label")
        label = float(fields[0] == "1")
        dense = []
        for name, text in zip(CRITEO_DENSE, fields[1:14]):
            try:
                dense.append(float(int(text)) if text else 0.0)
            except ValueError:
                raise LineError(f"integer feature {text!r} is not an integer", name) from None
        bags = []
        for name, token in zip(CRITEO_SPARSE, fields[14:]):
            if token:
                try:
                    int(token, 16)
                except ValueError:
                    raise LineError(f"categorical value {token!r} is not hexadecimal", name) from None
            bags.append(([token or MISSING], None))
        return label, dense, bags


class LibFMFormat:
    """`label idx:val idx:val ...`; labels +1/-1 or 1/0.

    Fields are either positional (the k-th `idx:val` of a line belongs to field k, as in
    Frappe and Criteo-as-libFM files) or given by `field_of`, a map from index to field
    name, in which case a field may hold several ids per line (a multi-hot bag). Values
    other than 1 make the field weighted.
    """

    header = False
    dense_names: tuple[str, ...] = ()

    def __init__(self, field_of: Mapping[str, str] | None = None, num_fields: int | None = None):
        self.field_of = dict(field_of) if field_of is not None else None
        if self.field_of is not None:
            self.sparse_names = tuple(dict.fromkeys(self.field_of.values()))
            self._column = {name: i for i, name in enumerate(self.sparse_names)}
        else:
            self.num_fields = num_fields
            self.sparse_names = tuple(f"field{k}" for k in range(num_fields or 0))

    def set_num_fields(self, n: int) -> None:
        """Positional files: the field count the training data showed."""
        self.num_fields = n
        self.sparse_names = tuple(f"field{k}" for k in range(n))

    def parse(self, line: str) -> Parsed:
        parts = line.split()
        label = parse_label(parts[0])
        pairs = []
        for k, part in enumerate(parts[1:]):
            index, sep, value = part.partition(":")
            if not sep or not index.isdigit():
                raise LineError(f"{part!r} is not index:value", f"position {k + 1}")
            try:
                number = float(value)
            except ValueError:
                raise LineError(f"value {value!r} is not a number", f"position {k + 1}") from None
            if not math.isfinite(number):
                raise LineError(f"value {value!r} is not finite", f"position {k + 1}")
            pairs.append((index, number))
        if self.field_of is None:
            if self.num_fields is not None and len(pairs) > self.num_fields:
                raise LineError(f"{len(pairs)} fields, but the training data has {self.num_fields}")
            return label, [], [([i], [v]) for i, v in pairs]
        bags = [([], []) for _ in self.sparse_names]
        for index, number in pairs:
            field = self.field_of.get(index)
            if field is None:
                raise LineError(f"index {index} is in no field of the field map")
            tokens, values = bags[self._column[field]]
            tokens.append(index)
            values.append(number)
        return label, [], bags


def read_field_map(path: str) -> dict[str, str]:
    """A libFM field map file: one `index field` pair per line."""
    mapping = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}:{number}: expected 'index field', got {line.strip()!r}")
            mapping[parts[0]] = parts[1]
    return mapping


class TabularColumns:
    """Label, dense and sparse columns picked by name out of a header (CSV or Parquet)."""

    def __init__(
        self, label: str, dense: Sequence[str], sparse: Sequence[str] | None, ignore=(), multi_hot_sep=None
    ):
        self.label, self.dense_names, self.requested_sparse = label, tuple(dense), sparse
        self.ignore, self.sep = tuple(ignore), multi_hot_sep
        self.sparse_names: tuple[str, ...] = tuple(sparse or ())

    def bind(self, header: Sequence[str], where: str) -> None:
        """Resolves names against a file's header; sparse defaults to every other column."""
        header = [h.strip() for h in header]
        if len(set(header)) != len(header):
            raise ValueError(f"{where}: duplicate column names in the header {header}")
        if self.requested_sparse is None:
            taken = {self.label, *self.dense_names, *self.ignore}
            sparse = tuple(h for h in header if h not in taken)
            if self.sparse_names and sparse != self.sparse_names:
                raise ValueError(
                    f"{where}: columns {list(sparse)} differ from the first file's {list(self.sparse_names)}"
                )
            self.sparse_names = sparse
        wanted = [self.label, *self.dense_names, *self.sparse_names]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise ValueError(f"{where}: no column(s) {missing} in the header {header}")
        self.positions = [header.index(c) for c in wanted]
        self.width = len(header)

    def parse_values(self, values: Sequence) -> Parsed:
        """One row given all of the header's columns."""
        return self.parse_ordered([values[p] for p in self.positions])

    def parse_ordered(self, values: Sequence) -> Parsed:
        """One row given [label, *dense, *sparse] values in that order."""
        label = parse_label(values[0], self.label)
        nd = len(self.dense_names)
        dense = [parse_dense(v, name) for v, name in zip(values[1 : 1 + nd], self.dense_names)]
        bags = [(self.bag(v), None) for v in values[1 + nd :]]
        return label, dense, bags

    def bag(self, value) -> list[str]:
        if value is None:
            return []
        if isinstance(value, (list, tuple)):  # Parquet list column
            return [str(v) for v in value if v is not None and str(v) != ""]
        text = str(value).strip()
        if not text:
            return []
        if self.sep is None:
            return [text]
        return [t for t in (p.strip() for p in text.split(self.sep)) if t]


class CSVFormat:
    """Delimited text with a header line; a field may hold a multi-hot bag `a|b|c`."""

    header = True

    def __init__(self, columns: TabularColumns, delimiter: str = ","):
        self.columns, self.delimiter = columns, delimiter

    @property
    def dense_names(self):
        return self.columns.dense_names

    @property
    def sparse_names(self):
        return self.columns.sparse_names

    def bind_header(self, line: str, where: str) -> None:
        self.columns.bind(self._split(line.rstrip("\r\n")), where)

    def _split(self, line: str) -> list[str]:
        if '"' in line:
            return next(csv.reader([line], delimiter=self.delimiter))
        return line.split(self.delimiter)

    def parse(self, line: str) -> Parsed:
        values = self._split(line.rstrip("\r\n"))
        if len(values) != self.columns.width:
            raise LineError(f"expected {self.columns.width} fields as in the header, got {len(values)}")
        return self.columns.parse_values(values)
